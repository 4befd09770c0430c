"""The worker process: one EngineCore between two shared-memory rings.

    python -m worker.process '<WorkerArgs as JSON>'

    load model -> send Ready, Status -> loop:
        read the inbox (add, cancel, shutdown)
        one engine step; send Tokens and Status
        sleep on the doorbell when there is nothing to do

Spawned by the front (server/worker_pool.py) by module name, with the
doorbell pipe ends inherited and its BLAS thread caps / CUDA_VISIBLE_DEVICES
already in the environment, so they apply before NumPy or CuPy load.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from worker.channel.messages import Message, decode, encode
from worker.channel.ring import Doorbell, Ring
from worker.channel.types import WorkerArgs

if TYPE_CHECKING:
    from worker.engine_core import EngineCore

LOAD_FAILED = 3  # exit status of a worker that could not load its model (see the log line)
IDLE_WAIT_S = 0.5  # an idle worker still wakes now and then, to notice a vanished front
FRONT_CHECK_S = 0.25  # a busy one (or one waiting on a full outbox) checks as often
FULL_RING_WAIT_S = 0.0005


class FrontGone(Exception):
    """The front process exited (e.g. SIGKILL): nobody reads the results; stop now."""


class WorkerLoop:
    def __init__(self, core: EngineCore, args: WorkerArgs, parent: int | None = None) -> None:
        self.core = core
        self.inbox, self.outbox = Ring.attach(args.inbox), Ring.attach(args.outbox)
        self.inbox_bell = Doorbell(read_fd=args.inbox_bell_fd)
        self.outbox_bell = Doorbell(write_fd=args.outbox_bell_fd)
        self.parent = os.getppid() if parent is None else parent  # the front
        self._checked_at = time.monotonic()

    def check_front(self, force: bool = False) -> None:
        """Raise FrontGone once the front has exited (we were re-parented); cheap to call often."""
        now = time.monotonic()
        if force or now - self._checked_at >= FRONT_CHECK_S:
            self._checked_at = now
            if os.getppid() != self.parent:
                raise FrontGone

    def send(self, messages: list[Message]) -> None:
        """Write messages in order, waiting while the ring is full (back-pressure, never loss)."""
        for message in messages:
            data = encode(message)
            while not self.outbox.try_write(data):
                self.outbox_bell.ring()  # make sure the front is draining
                time.sleep(FULL_RING_WAIT_S)
                self.check_front()  # a front that died reads nothing: do not wait for ever
        if messages:
            self.outbox_bell.ring()

    def run(self) -> None:
        """Serve until Shutdown; return at once if the front has gone (FrontGone)."""
        try:
            self._serve()
        except FrontGone:
            logging.getLogger("shoal.worker").warning("the front is gone; exiting")

    def _serve(self) -> None:
        core = self.core
        self.check_front(force=True)  # it may have died while the model loaded
        self.send([core.ready(), core.status()])
        while not core.stopped:
            self.check_front()  # busy: steps run back to back, never reaching the idle wait
            out: list[Message] = []
            received = False
            for raw in self.inbox.read_messages():
                received = True
                out += core.receive(decode(raw))
            if received or core.has_work():
                out += core.step()
            self.send(out)
            if not out and not core.stopped and not self.inbox_bell.wait(IDLE_WAIT_S):
                self.check_front(force=True)  # idle: woke with nothing to do

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # before the model loads: the front may die meanwhile
    args = WorkerArgs.from_json((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s",
    )
    # The front handles SIGINT / SIGTERM and tells workers to stop through the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from worker.batch_processor import BatchProcessor  # NumPy: after the thread caps
    from worker.engine_core import EngineCore
    from worker.model_config import CheckpointError

    try:
        core = EngineCore(BatchProcessor.from_model_dir(args.model_dir, args.engine))
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        logging.getLogger("shoal.worker").error("could not load the model: %s", err)
        return LOAD_FAILED
    loop = WorkerLoop(core, args, parent)
    try:
        loop.run()
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
