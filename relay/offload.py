"""The CPU-heavy work of one big message, off the event loop.

Reading a message at acceptance and rendering a copy of it at delivery are plain Python over its bytes: for a
39 MB message, one of 100,000 header fields or of 10,000 HTML parts, that is up to a second during which the
loop served no one (SMTP, deliveries, the tracking listener in the same process). Such work runs in a thread;
the GIL then hands the loop the interpreter every switch interval (5 ms), so other connections keep being
served. Small messages, nearly all of them, stay on the loop: for them the hop to a thread and back (about
0.1 ms) costs more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")

# One thread: the GIL runs one thread at a time anyway, and each further thread waiting for it delays the loop by
# another switch interval. (nginx's thread pools hold 32 threads, for blocking file reads that release the CPU;
# this work does not.) Measured with four 100,000-field messages at once: the same total time with 1, 2 or 6
# threads; pixel latency p50 while they were read 8-11 ms with one thread, 18-21 ms with two, 41 ms with six.
THREADS = 1
_executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="relay-cpu")


async def run(heavy: bool, fn: Callable[..., T], *args) -> T:
    """`fn(*args)`: in a thread when `heavy`, else right here on the loop."""
    if not heavy:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_executor, partial(fn, *args))
