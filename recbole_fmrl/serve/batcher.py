"""Dynamic batching: concurrent requests coalesced into one network pass.

A request waits at most ``max_wait_ms`` for others to join it, and a batch holds at most
``max_batch`` queries. While the worker thread runs one batch, the next one fills, so under load
batches grow by themselves and the wait is rarely paid. Every model call (batches, session events)
goes through the one worker thread: the engine needs no locks and torch keeps its thread count.
"""
import asyncio
from concurrent.futures import ThreadPoolExecutor


class Batcher:
    def __init__(self, run_batch, max_batch=64, max_wait_ms=2.0, on_batch=None):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda n: None)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmrl-model")
        self.queue, self.task = None, None

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self):
        """Finish what is queued, then stop the loop and the worker."""
        if self.task is not None:
            await self.queue.join()
            self.task.cancel()
            self.task = None
        self.worker.shutdown(wait=True)

    async def submit(self, query):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((query, future))
        return await future

    async def call(self, fn, *args, **kwargs):
        """Run ``fn`` in the model thread (between batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    async def loop(self):
        while True:
            batch = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            await self.run(batch)

    async def run(self, batch):
        queries = [query for query, _ in batch]
        try:
            results = await self.call(self.run_batch, queries)
            self.on_batch(len(queries))
        except Exception as err:  # noqa: BLE001 - a bug in one batch answers its requests with the error
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_exception(result) if isinstance(result, BaseException) else future.set_result(result)
            self.queue.task_done()
