"""The worker process: one BatchProcessor fed from the channel.

    load model -> report Ready -> loop:
        drain the inbox (add, cancel, shutdown)
        admit waiting requests while the processor has room
        one process_step; write Tokens and Status
        sleep on the doorbell when there is nothing to do

Spawned by the front (spawn start method). The environment from the
arguments is applied before NumPy is imported: N CPU workers each get
cores / N BLAS threads, so replicas share the cores instead of each starting
one thread per core; with --device cuda, worker i sees only GPU i.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.channel.messages import (
    Add,
    Cancel,
    Message,
    Ready,
    Rejected,
    Shutdown,
    Status,
    TokenRecord,
    Tokens,
    decode,
    encode,
)
from worker.channel.ring import Doorbell, Ring
from worker.engine_config import EngineConfig
from worker.sequence import FinishReason

if TYPE_CHECKING:
    from worker.batch_processor import BatchProcessor

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_environment(index: int, workers: int, device: str, cores: int) -> dict[str, str]:
    """Per-worker environment: CPU replicas split the cores; GPU workers get one device each."""
    env = {name: str(max(1, cores // workers)) for name in BLAS_THREAD_VARIABLES}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env


IDLE_WAIT_S = 1.0  # an idle worker still wakes now and then, to notice a vanished front


@dataclass
class WorkerArgs:
    """Everything a worker needs, passed (pickled by multiprocessing) at spawn."""

    index: int
    model_dir: str
    engine: EngineConfig
    inbox: str  # segment names
    outbox: str
    inbox_bell: Doorbell
    outbox_bell: Doorbell
    env: dict[str, str] = field(default_factory=dict)  # BLAS thread caps, CUDA_VISIBLE_DEVICES


class WorkerLoop:
    def __init__(
        self, processor: BatchProcessor, args: WorkerArgs, inbox: Ring, outbox: Ring
    ) -> None:
        self.processor = processor
        self.args = args
        self.inbox, self.outbox = inbox, outbox
        self.waiting: OrderedDict[int, Add] = OrderedDict()  # arrived, not yet admitted
        self.running = True

    # -- sending ----------------------------------------------------------------------
    def send(self, message: Message) -> None:
        """Write a message, waiting while the ring is full (back-pressure, never loss)."""
        for payload, flags in self.outbox.frames_of(encode(message)):
            while not self.outbox.try_write_frame(payload, flags):
                self.args.outbox_bell.ring()  # make sure the front is draining
                time.sleep(0.0005)
        self.args.outbox_bell.ring()

    def send_status(self) -> None:
        stats = self.processor.get_stats()
        self.send(
            Status(
                active_sequences=stats.active_sequences,
                free_slots=stats.free_slots,
                waiting=len(self.waiting) + stats.queue_length,
                kv_blocks_used=stats.kv_blocks_used,
                kv_blocks_total=stats.kv_blocks_total,
                total_tokens=stats.total_tokens,
                preemptions=stats.preemptions,
            )
        )

    # -- receiving --------------------------------------------------------------------
    def handle(self, message: Message) -> list[TokenRecord]:
        match message:
            case Add():
                self.waiting[message.handle] = message
            case Cancel(handle):
                return self.cancel(handle)
            case Shutdown():
                self.running = False
        return []

    def cancel(self, handle: int) -> list[TokenRecord]:
        if self.waiting.pop(handle, None) is not None:
            return [TokenRecord(handle, -1, 0, FinishReason.CANCELLED)]
        event = self.processor.cancel(str(handle))
        if event is None:
            return []  # already finished: its last record is on its way
        return [TokenRecord(handle, -1, event.index, FinishReason.CANCELLED)]

    def admit(self) -> None:
        while self.waiting:
            handle, add = next(iter(self.waiting.items()))
            try:
                accepted = self.processor.add_request(
                    str(handle), add.prompt_ids, add.params, add.priority, add.generated
                )
            except ValueError as err:
                self.waiting.pop(handle)
                self.send(Rejected(handle, str(err)))
                continue
            if not accepted:
                return
            self.waiting.pop(handle)

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while self.running:
            records: list[TokenRecord] = []
            for raw in self.inbox.read_messages():
                records += self.handle(decode(raw))
            self.admit()
            if self.processor.has_work():
                events = self.processor.process_step()
                records += [
                    TokenRecord(int(e.request_id), e.token_id, e.index, e.finish_reason)
                    for e in events
                ]
            if records:
                self.send(Tokens(records))
            if records or self.processor.has_work():
                self.send_status()
            elif self.running and not self.waiting:
                self.args.inbox_bell.wait(IDLE_WAIT_S)


def run_worker(args: WorkerArgs) -> None:
    """Process entry point (the target of multiprocessing.Process)."""
    os.environ.update(args.env)  # before NumPy / CuPy are imported below
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s",
    )
    # The front handles SIGINT / SIGTERM and tells workers to stop through the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from worker.batch_processor import BatchProcessor  # imports NumPy: after the thread caps

    inbox, outbox = Ring.attach(args.inbox), Ring.attach(args.outbox)
    try:
        processor = BatchProcessor.from_model_dir(args.model_dir, args.engine)
        loop = WorkerLoop(processor, args, inbox, outbox)
        loop.send(
            Ready(
                pid=os.getpid(),
                max_batch_size=args.engine.max_batch_size,
                kv_blocks_total=processor.layout.num_blocks,
                block_size=args.engine.block_size,
                max_seq_len=processor.max_seq_len,
                vocab_size=processor.model_config.vocab_size,
                eos_token_ids=processor.model_config.eos_token_ids,
                device=processor.runner.backend.describe(),
                model_name=processor.model_config.name,
                architecture=processor.model_config.model_type,
            )
        )
        loop.run()
    finally:
        inbox.close()
        outbox.close()
