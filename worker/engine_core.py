"""EngineCore: a BatchProcessor driven by channel messages, whatever carries them.

Both transports run this: the worker process (worker/process.py) between
shared-memory rings, and the in-process engine (worker/inprocess.py) for the
offline batch runner. Messages in, messages out:

    receive(Add)     -> [] or [Rejected]      the request joins the scheduler's queue
    receive(Cancel)  -> [Tokens([record])]    or [] if it already finished
    step()           -> [Tokens(...), Status]  one engine step, then the load after it
"""

from __future__ import annotations

import os
import zlib

from worker.batch_processor import BatchProcessor
from worker.channel.messages import Add, Cancel, Message, Ready, Rejected, Shutdown, Status, Tokens


class EngineCore:
    def __init__(self, processor: BatchProcessor) -> None:
        self.processor = processor
        self.stopped = False
        self.adds_received = 0  # echoed in Status: the front subtracts what is in flight
        self.add_tokens_received = 0

    def ready(self) -> Ready:
        p, chat = self.processor, self.processor.chat_template
        return Ready(
            pid=os.getpid(),
            max_batch_size=p.config.max_batch_size,
            kv_blocks_total=p.layout.num_blocks,
            block_size=p.config.block_size,
            max_seq_len=p.max_seq_len,
            vocab_size=p.model_config.vocab_size,
            eos_token_ids=p.model_config.eos_token_ids,
            device=p.runner.backend.describe(),
            model_name=p.model_config.name,
            architecture=p.model_config.model_type,
            tokenizer_zlib=zlib.compress(p.tokenizer.to_str().encode(), 6),
            chat_template=chat.source if chat else "",
            bos_token=chat.bos_token if chat else "",
            eos_token=chat.eos_token if chat else "",
        )

    def receive(self, message: Message) -> list[Message]:
        match message:
            case Add():
                self.adds_received += 1
                self.add_tokens_received += message.num_tokens
                try:
                    self.processor.add_request(
                        message.handle,
                        message.prompt_ids,
                        message.params,
                        message.priority,
                        message.generated,
                    )
                except ValueError as err:
                    return [Rejected(message.handle, str(err))]
            case Cancel(handle):
                record = self.processor.cancel(handle)
                return [Tokens([record])] if record is not None else []
            case Shutdown():
                self.stopped = True
            case _:
                raise TypeError(f"a worker does not receive {type(message).__name__}")
        return []

    def has_work(self) -> bool:
        return self.processor.has_work()

    def step(self) -> list[Message]:
        """One engine step (when there is work), then the Status after it."""
        out: list[Message] = []
        if self.processor.has_work():
            records = self.processor.process_step()
            if records:
                out.append(Tokens(records))
        out.append(self.status())
        return out

    def status(self) -> Status:
        return self.processor.get_stats(self.adds_received, self.add_tokens_received)
