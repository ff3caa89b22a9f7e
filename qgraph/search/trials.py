"""Running trials: an on-disk trial cache, and local (inline / process pool) or Ray execution.

The cache is a JSON-lines file, one line per finished trial keyed by ``sha256(eval fingerprint +
strategy hash)`` and carrying a ``digest`` (sha256 of its canonical JSON without the digest), so an edited or
torn line fails its check and the trial is computed again; each line is written with one ``write`` and then flushed and fsynced, so a search
killed at any moment loses at most the trial it was running. Loading skips a torn last line (and the
next append starts on a fresh line). Side files next to it (``<cache>.<name>.json``, written atomically)
keep other resumable results such as the sensitivity table.

Workers rebuild their own `Workbench` from the picklable `EvalConfig` (spawned processes share nothing),
evaluate strategies sent as canonical JSON and return plain dicts; only the parent writes the cache.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from qgraph.search.objectives import EvalConfig, Workbench
from qgraph.search.space import SearchError
from qgraph.search.strategy import Strategy


def trial_key(strategy: Strategy, fingerprint: str) -> str:
    return hashlib.sha256(f"{fingerprint}:{strategy.sha256}".encode()).hexdigest()


def record_digest(rec: dict[str, Any]) -> str:
    """sha256 of a cache record's canonical JSON, its own ``digest`` field left out."""
    body = {k: v for k, v in rec.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TrialCache:
    """Append-only JSON-lines store of finished trials (``path=None``: in memory only)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._newline_needed = False
        if self.path is not None and self.path.exists():
            raw = self.path.read_bytes()
            self._newline_needed = bool(raw) and not raw.endswith(b"\n")
            for line in raw.decode("utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or rec.get("digest") != record_digest(rec):
                        raise ValueError("digest mismatch")
                    self.records[str(rec["key"])] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.skipped_lines += 1

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        rec = {"key": key, **{k: v for k, v in record.items() if k != "digest"}}
        rec["digest"] = record_digest(rec)
        self.records[key] = rec
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = ("\n" if self._newline_needed else "") + json.dumps(rec, sort_keys=True) + "\n"
        self._newline_needed = False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = line.encode()
            while data:
                n = os.write(fd, data)
                data = data[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- side files -----------------------------------------------------------------------------
    def side_path(self, name: str) -> Path | None:
        return None if self.path is None else self.path.with_name(f"{self.path.name}.{name}.json")

    def load_side(self, name: str, fingerprint: str) -> Any:
        p = self.side_path(name)
        if p is None or not p.exists():
            return None
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return d.get("data") if d.get("fingerprint") == fingerprint else None

    def save_side(self, name: str, fingerprint: str, data: Any) -> None:
        p = self.side_path(name)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint, "data": data}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


# --- worker side -------------------------------------------------------------------------------------
_BENCH: Workbench | None = None


def _exit_with_parent(ppid: int) -> None:
    """A pool worker whose parent was killed (SIGKILL leaves no chance to shut the pool down) is re-parented;
    notice that and exit instead of lingering."""
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:
            os._exit(0)


def _init_worker(config: EvalConfig, watch_parent: bool = True) -> None:
    global _BENCH
    import torch

    if watch_parent:
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["QGRAPH_QUIET"] = "1"
    torch.set_num_threads(max(1, config.threads))
    _BENCH = Workbench(config)


def _evaluate_json(strategy_json: str) -> dict[str, Any]:
    assert _BENCH is not None, "worker not initialised"
    return _BENCH.evaluate(Strategy.from_json(strategy_json))


def _ping() -> int:
    return os.getpid()


class _RayEvaluator:
    """A Ray actor holding one Workbench."""

    def __init__(self, config: EvalConfig):
        _init_worker(config, watch_parent=False)

    def evaluate(self, strategy_json: str) -> dict[str, Any]:
        return _evaluate_json(strategy_json)


# --- runner ------------------------------------------------------------------------------------------
class TrialRunner:
    """Evaluates strategies with caching: inline (``workers=0``), in a spawn process pool, or on Ray
    (``ray_address``: a cluster address, or ``"local"`` to start a local Ray with ``workers`` CPUs).

    ``on_result(strategy, result, cached)`` is called once per strategy as it finishes.
    """

    def __init__(self, config: EvalConfig, *, cache: TrialCache | None = None, workers: int = 2,
                 ray_address: str | None = None, bench: Workbench | None = None,
                 on_result: Callable[[Strategy, dict[str, Any], bool], None] | None = None):
        self.config = config
        self.fingerprint = config.fingerprint()
        self.cache = cache if cache is not None else TrialCache(None)
        self.workers = max(0, int(workers))
        self.ray_address = ray_address
        self.bench = bench
        self.on_result = on_result
        self.evaluated = 0
        self.cached = 0
        self._pool: ProcessPoolExecutor | None = None
        self._actors: list[Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start workers now (they load the model while the parent does other work)."""
        if self.ray_address is not None:
            self._ray_actors()
        elif self.workers > 0 and self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.config,))
            for _ in range(self.workers):
                self._pool.submit(_ping)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._actors = None

    def __enter__(self) -> TrialRunner:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- evaluation ------------------------------------------------------------------------------
    def run(self, strategies: Sequence[Strategy]) -> list[dict[str, Any]]:
        """Results in input order; cached strategies are not re-evaluated, duplicates run once."""
        keys = [trial_key(s, self.fingerprint) for s in strategies]
        todo: dict[str, Strategy] = {}
        for k, s in zip(keys, strategies):
            if k in self.cache:
                continue
            todo.setdefault(k, s)
        for k, s in zip(keys, strategies):
            if k in self.cache and k not in todo:
                self.cached += 1
                if self.on_result:
                    self.on_result(s, self.cache.get(k)["result"], True)
        if todo:
            if self.ray_address is not None:
                self._run_ray(todo)
            elif self.workers > 0:
                self._run_pool(todo)
            else:
                self._run_inline(todo)
        return [dict(self.cache.get(k)["result"]) for k in keys]

    def _finish(self, key: str, strategy: Strategy, result: dict[str, Any]) -> None:
        self.cache.put(key, {"strategy_sha256": strategy.sha256, "eval": self.fingerprint,
                             "strategy": strategy.to_dict(), "result": result})
        self.evaluated += 1
        if self.on_result:
            self.on_result(strategy, result, False)

    def _run_inline(self, todo: dict[str, Strategy]) -> None:
        if self.bench is None:
            self.bench = Workbench(self.config)
        for k, s in todo.items():
            self._finish(k, s, self.bench.evaluate(s))

    def _run_pool(self, todo: dict[str, Strategy]) -> None:
        self.start()
        assert self._pool is not None
        futures: dict[Future, str] = {self._pool.submit(_evaluate_json, s.canonical_json()): k for k, s in todo.items()}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=lambda f: futures[f]):
                    k = futures[f]
                    try:
                        result = f.result()
                    except Exception as e:  # noqa: BLE001 - a worker failed: surface its message, not a pool traceback
                        raise SearchError(f"trial worker failed: {type(e).__name__}: {e}") from None
                    self._finish(k, todo[k], result)
        finally:
            for f in pending:
                f.cancel()

    def _ray_actors(self) -> list[Any]:
        if self._actors is not None:
            return self._actors
        try:
            import ray
        except ImportError:
            raise SearchError("--ray needs the 'ray' package, which is not installed: pip install ray") from None
        if not ray.is_initialized():
            if self.ray_address in ("local", ""):
                ray.init(num_cpus=max(1, self.workers), include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True)
            else:
                ray.init(address=self.ray_address, log_to_driver=False, ignore_reinit_error=True)
        actor = ray.remote(num_cpus=1)(_RayEvaluator)
        self._actors = [actor.remote(self.config) for _ in range(max(1, self.workers))]
        return self._actors

    def _run_ray(self, todo: dict[str, Strategy]) -> None:
        import ray

        actors = self._ray_actors()
        queue = list(todo.items())
        running: dict[Any, tuple[str, Any]] = {}
        idle = list(actors)
        while queue or running:
            while queue and idle:
                k, s = queue.pop(0)
                a = idle.pop(0)
                running[a.evaluate.remote(s.canonical_json())] = (k, a)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                k, a = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - any remote failure
                    raise SearchError(f"ray trial failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
                self._finish(k, todo[k], result)
                idle.append(a)
