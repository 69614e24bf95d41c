"""Why `rl3d train --overlap 1` shortens the GIL's switch interval while it samples in the background.

The overlapped sampler is a thread whose work is on the device: at each token it holds the GIL for a
few microseconds (a CUDA graph replay) and lets go while the device works. The main thread meanwhile
runs Python nearly nonstop (render's batches, the reward's rows, the update's kernel launches). A
thread that asks for the GIL waits until the holder's switch interval runs out (5 ms by default),
so every token of the sampler can wait up to 5 ms. This models the two threads with plain Python
(a token: ~3 us of Python, then 0.2 ms of device time as a sleep) and prints, for each interval,
the sampler's time beside the busy thread against alone, and the busy thread's speed against alone.

    python benchmarks/bench_switch_interval.py [--tokens 2000]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

DEVICE_S = 0.0002  # the device's time a token, during which the sampler thread holds no GIL


def sampler(tokens: int, out: list) -> None:
    t0 = time.perf_counter()
    for _ in range(tokens):
        sum(range(50))  # the replay call's own Python
        time.sleep(DEVICE_S)
    out.append(time.perf_counter() - t0)


def busy(stop: threading.Event, done: list) -> None:
    while not stop.is_set():
        s = 0
        for i in range(1000):
            s += i
        done[0] += 1


def busy_rate(seconds: float) -> float:
    stop, done = threading.Event(), [0]
    t = threading.Thread(target=busy, args=(stop, done))
    t0 = time.perf_counter()
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join()
    return done[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000, help="tokens the sampler thread steps through")
    a = ap.parse_args()
    own = sys.getswitchinterval()
    try:
        for interval in (own, 0.0005, 0.0002, 0.0001):
            sys.setswitchinterval(interval)
            alone: list = []
            sampler(a.tokens, alone)
            rate_alone = busy_rate(1.0)
            stop, done, beside = threading.Event(), [0], []
            b = threading.Thread(target=busy, args=(stop, done))
            t0 = time.perf_counter()
            b.start()
            s = threading.Thread(target=sampler, args=(a.tokens, beside))
            s.start()
            s.join()
            stop.set()
            b.join()
            rate = done[0] / (time.perf_counter() - t0)
            print(f"switch interval {interval * 1e3:5.2f} ms: sampler {beside[0]:6.2f} s beside the busy thread, "
                  f"{beside[0] / alone[0]:5.1f}x its time alone; busy thread at {rate / rate_alone:4.0%} of its speed alone")
    finally:
        sys.setswitchinterval(own)


if __name__ == "__main__":
    main()
