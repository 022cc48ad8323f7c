"""Coordination primitives against raw redis-py doing the same round trips,
and against the peer libraries, interleaved in one run.

    python benchmarks/bench_coordination.py      # BENCH_SCALE=0.1 for a quick run

- lock acquire+release: ours vs raw ``SET NX PX`` + Lua release, redis-py
  ``Lock``, python-redis-lock;
- fenced acquire: ours (acquire takes the fencing token) vs one raw script
  doing ``SET NX`` + ``INCR``;
- contended hand-off (release -> the waiting holder runs), p50 and p99: ours
  (signal list) vs redis-py ``Lock`` (polls every 100 ms);
- rate-limit hit: ours vs one raw ``EVALSHA`` of the same script, and
  ``limits``' moving window and sliding window counter;
- session get: ours vs a raw ``GETEX`` + JSON decode.

Targets: each of ours <= 1.2x its raw counterpart; hand-off p50 <= 2 ms;
rate-limit hit no slower than the fastest ``limits`` strategy.
Peers come from the ``bench`` extra; a missing one is skipped.
"""

from __future__ import annotations

import itertools
import json
import secrets
import statistics
import threading
import time
import uuid
from collections.abc import Callable

import redis
from _common import bench_database, interleaved_us, iterations, print_table

from orchestrator_data import DataLayer, Settings
from orchestrator_data.coordination import locks, rate_limit

RAW_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
RAW_FENCED = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""


def handoff_ms(make_lock: Callable[[], object], rounds: int) -> tuple[float, float]:
    """p50 and p99 of release -> a blocked waiter holding the lock, in ms."""
    delays: list[float] = []
    for _ in range(rounds):
        holder = make_lock()
        holder.acquire()  # type: ignore[attr-defined]
        got: list[float] = []
        ready = threading.Event()

        def wait(got: list[float] = got, ready: threading.Event = ready) -> None:
            waiter = make_lock()
            ready.set()
            waiter.acquire()  # type: ignore[attr-defined]
            got.append(time.perf_counter())
            waiter.release()  # type: ignore[attr-defined]

        thread = threading.Thread(target=wait)
        thread.start()
        ready.wait()
        time.sleep(0.02)  # the waiter is blocked (or polling) by now
        released = time.perf_counter()
        holder.release()  # type: ignore[attr-defined]
        thread.join()
        delays.append((got[0] - released) * 1000)
    delays.sort()
    return statistics.median(delays), delays[min(len(delays) - 1, int(len(delays) * 0.99))]


def main() -> None:
    with bench_database("od_bench_coord") as base:
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        settings = Settings(
            database_url=base.database_url,
            redis_url=base.redis_url,
            key_prefix=prefix,
            warm_pool=False,
            cache_enabled=False,
        )
        dl = DataLayer(settings)
        client: redis.Redis = redis.Redis.from_url(base.redis_url)
        release_script = client.register_script(RAW_RELEASE)
        fenced_script = client.register_script(RAW_FENCED)
        n = itertools.count()

        # -- lock acquire + release ------------------------------------------
        def ours() -> None:
            lock = dl.lock(f"l{next(n) % 64}", ttl=30)
            lock.acquire(blocking=False)
            lock.release()

        def raw() -> None:
            key, token = f"{prefix}raw:{next(n) % 64}", secrets.token_hex(16)
            client.set(key, token, nx=True, px=30_000)
            release_script(keys=[key], args=[token])

        def redis_py() -> None:
            lock = client.lock(f"{prefix}rp:{next(n) % 64}", timeout=30)
            lock.acquire(blocking=False)
            lock.release()

        contenders: dict[str, Callable[[], object]] = {
            "raw": raw,
            "ours": ours,
            "redis-py Lock": redis_py,
        }
        try:
            import redis_lock

            def python_redis_lock() -> None:
                lock = redis_lock.Lock(client, f"{prefix}prl:{next(n) % 64}", expire=30)
                lock.acquire(blocking=False)
                lock.release()

            contenders["python-redis-lock"] = python_redis_lock
        except ImportError:
            print("python-redis-lock not installed (the bench extra): skipped")
        cycle = interleaved_us(contenders, iterations=iterations(4000))

        # -- fenced acquire ----------------------------------------------------------
        held: list[locks.Lock] = []

        def ours_fenced() -> None:
            lock = dl.lock(f"f{next(n)}", ttl=30)
            lock.acquire(blocking=False)
            held.append(lock)

        def raw_fenced() -> None:
            i = next(n)
            fenced_script(
                keys=[f"{prefix}{{rf:{i}}}", f"{prefix}{{rf:{i}}}:fence"],
                args=[secrets.token_hex(16), 30_000],
            )

        fenced = interleaved_us(
            {"raw": raw_fenced, "ours": ours_fenced}, iterations=iterations(4000)
        )

        # -- hand-off ----------------------------------------------------------------
        rounds = max(20, iterations(200) // 2)
        ours_p50, ours_p99 = handoff_ms(lambda: dl.lock("handoff", ttl=30), rounds)
        rp_p50, rp_p99 = handoff_ms(
            lambda: client.lock(f"{prefix}handoff-rp", timeout=30), max(10, rounds // 4)
        )

        # -- rate limit ----------------------------------------------------------------
        limiter = dl.rate_limiter
        raw_limit = client.register_script(rate_limit._HIT)
        limit_key = f"{prefix}{{rate:raw}}"

        def ours_hit() -> None:
            limiter.hit("ours", limit=1_000_000, window=60)

        def raw_hit() -> None:
            raw_limit(keys=[limit_key], args=[1_000_000, 60_000_000, 1, uuid.uuid4().hex])

        hits: dict[str, Callable[[], object]] = {"raw EVALSHA": raw_hit, "ours": ours_hit}
        try:
            from limits import RateLimitItemPerMinute
            from limits.storage import RedisStorage
            from limits.strategies import (
                MovingWindowRateLimiter,
                SlidingWindowCounterRateLimiter,
            )

            storage = RedisStorage(base.redis_url, key_prefix=f"{prefix}limits")
            item = RateLimitItemPerMinute(1_000_000)
            moving = MovingWindowRateLimiter(storage)
            sliding = SlidingWindowCounterRateLimiter(storage)
            hits["limits moving window"] = lambda: moving.hit(item, "m")
            hits["limits sliding window counter"] = lambda: sliding.hit(item, "s")
        except ImportError:
            print("limits not installed (the bench extra): skipped")
        # Fewer hits: the moving window keeps every hit of the window.
        limited = interleaved_us(hits, iterations=iterations(2000))

        # -- session get -------------------------------------------------------------
        store = dl.session_store
        session = store.create("bench-user", {"cart": [1, 2, 3], "theme": "dark"})
        raw_key = f"{prefix}{{session:raw}}"
        client.set(raw_key, json.dumps({"user_id": "bench-user", "data": {"cart": [1, 2, 3]}}))

        def ours_get() -> None:
            store.get(session.key)

        def raw_get() -> None:
            json.loads(client.getex(raw_key, ex=3600) or b"{}")

        gets = interleaved_us({"raw": raw_get, "ours": ours_get}, iterations=iterations(4000))

        rows = [
            ("raw SET NX PX + Lua release", cycle["raw"], "raw", 1.0),
            ("ours acquire+release", cycle["ours"], "raw", cycle["ours"] / cycle["raw"]),
        ]
        rows += [
            (f"{name} acquire+release", us, "ours", us / cycle["ours"])
            for name, us in cycle.items()
            if name not in ("raw", "ours")
        ]
        print_table("Lock acquire + release (uncontended)", rows)
        print_table(
            "Fenced acquire",
            [
                ("raw script SET NX + INCR", fenced["raw"], "raw", 1.0),
                ("ours acquire (token in the same script)", fenced["ours"], "raw",
                 fenced["ours"] / fenced["raw"]),
            ],
        )  # fmt: skip
        print("\n### Contended hand-off (release -> waiting holder runs)\n")
        print("| lock | p50 ms | p99 ms |")
        print("|---|---:|---:|")
        print(f"| ours (signal list) | {ours_p50:.2f} | {ours_p99:.2f} |")
        print(f"| redis-py Lock (polls) | {rp_p50:.2f} | {rp_p99:.2f} |")
        base_hit = limited["raw EVALSHA"]
        print_table(
            "Rate-limit hit",
            [(name, us, "raw EVALSHA", us / base_hit) for name, us in limited.items()],
        )
        print_table(
            "Session get (slides the TTL)",
            [
                ("raw GETEX + JSON decode", gets["raw"], "raw", 1.0),
                ("ours session_store.get", gets["ours"], "raw", gets["ours"] / gets["raw"]),
            ],
        )
        peers = [us for name, us in limited.items() if name.startswith("limits")]
        fastest = min(peers) if peers else float("nan")
        print(
            f"\ntargets: acquire+release <= 1.2x raw ({cycle['ours'] / cycle['raw']:.2f}x), "
            f"fenced acquire <= 1.2x raw ({fenced['ours'] / fenced['raw']:.2f}x), "
            f"hand-off p50 <= 2 ms ({ours_p50:.2f} ms), "
            f"rate-limit hit <= 1.2x raw ({limited['ours'] / base_hit:.2f}x) and "
            f"<= fastest limits strategy ({limited['ours'] / fastest:.2f}x of it), "
            f"session get <= 1.2x raw ({gets['ours'] / gets['raw']:.2f}x)"
        )
        for lock in held:
            lock.release()
        for pattern in (f"{prefix}*",):
            for key in client.scan_iter(pattern, count=1000):
                client.delete(key)
        client.close()
        dl.close()


if __name__ == "__main__":
    main()
