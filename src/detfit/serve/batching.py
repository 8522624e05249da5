"""Requests that arrive together share one model call: a queue, one task that gathers up to
``max_batch`` images within ``max_wait_s`` of the first, and one thread that runs the model.
Each request holds its own future and the model returns one result per image in order, so a
result can only reach the request whose image it was computed from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Result = TypeVar("Result")


@dataclass
class _Job:
    image: Any
    future: asyncio.Future


class Batcher(Generic[Result]):
    """``await batcher.submit(image)`` -> ``run([... image ...])``'s entry for that image."""

    def __init__(
        self,
        run: Callable[[Sequence[Any]], Sequence[Result]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.run, self.max_batch, self.max_wait_s, self.on_batch = (
            run,
            max_batch,
            max_wait_s,
            on_batch,
        )
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        # one thread: the model is called by one caller at a time, batches form meanwhile
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="detfit-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._serve(), name="detfit-batcher")

    async def stop(self) -> None:
        """After the server has drained its requests: end the task, release the thread."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, image: Any) -> Result:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(image, future))
        return await future

    async def _gather(self) -> list[_Job]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return [job for job in batch if not job.future.done()]  # a client that left is skipped

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(
                    self.executor, self.run, [job.image for job in batch]
                )
                outcomes: list[tuple[_Job, Any, BaseException | None]] = [
                    (job, result, None) for job, result in zip(batch, results, strict=True)
                ]
            except Exception:
                # one image the model fails on must not fail the others: rerun them one by one
                outcomes = [await self._alone(job) for job in batch]
            for job, result, error in outcomes:
                if job.future.done():
                    continue
                if error is None:
                    job.future.set_result(result)
                else:
                    job.future.set_exception(error)

    async def _alone(self, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        loop = asyncio.get_running_loop()
        try:
            (result,) = await loop.run_in_executor(self.executor, self.run, [job.image])
            return job, result, None
        except Exception as exc:
            return job, None, exc
