"""The window scheduler of ``emorl serve`` (``--scheduler window``, the first design, kept for the load benchmark
and for seq2seq backbones): a batch forms while requests keep arriving and decodes to its end in one
:func:`~emorl.ensemble.pairs.generate_pairs` call. Split from the engine so that the engine holds what both
schedulers share (the loaded run, the queue, cancellation) and each scheduler its own loop."""

from __future__ import annotations

import logging
import time
from typing import Any

from emorl.ensemble.pairs import PairResult, generate_pairs

log = logging.getLogger("emorl.serve")


class WindowScheduler:
    """The window loop over an :class:`~emorl.serve.engine.Engine`'s queue (run on its decode thread)."""

    def __init__(self, engine: Any) -> None:
        self.e = engine
        self.idle_since = float("-inf")  # when the last batch ended: a job that waited through it waits from here

    def take(self) -> list[Any] | None:
        """Wait for the next batch: the oldest job plus same-key jobs that arrive while jobs keep coming (gaps under
        ``max_gap_s``), for at most ``max_wait_s`` after the oldest. The window opens no earlier than the end of the
        previous batch: a client whose reply ended early sends its next request while the batch still decodes, and
        without this it would start a batch of one the moment the batch ends, ahead of the clients it finished with
        (16 closed-loop clients then split 16, 1, 15; bench/RESULTS.md, "Serving run 9")."""
        e = self.e
        with e._cond:
            while not e._queue and not e._stopping:
                e._cond.wait()
            if e._stopping:
                return None
            while True:
                e._drop_cancelled()
                if not e._queue:
                    return []
                first = e._queue[0]
                same = [j for j in e._queue if j.key == first.key]
                opened = max(first.submitted, self.idle_since)
                latest = max(max(j.submitted for j in same), self.idle_since)
                left = min(opened + e.max_wait_s, latest + e.max_gap_s) - time.monotonic()
                if left <= 0 or self.rows(same) >= e.max_batch_rows or e._stopping:
                    break
                e._cond.wait(left)
            batch: list[Any] = []
            for j in same:
                if batch and self.rows(batch + [j]) > e.max_batch_rows:
                    break
                batch.append(j)
            e._queue = [j for j in e._queue if j not in batch]
            e._busy = True
            return batch

    @staticmethod
    def rows(jobs: list[Any]) -> int:
        """Backbone rows a batch of these jobs takes: pairs x adapters used by any of them (params: pairs)."""
        pairs = [p for j in jobs for p in j.pairs]
        if not pairs or jobs[0].key == "params":
            return max(1, len(pairs))
        used = {i for p in pairs for i, w in enumerate(p.weights) if w > 0}
        return len(pairs) * (len(used) + (1 if jobs[0].key.endswith("+base") else 0))

    def run(self) -> None:
        e = self.e
        while True:
            batch = self.take()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self.decode(batch)
            except Exception as ex:  # a failed batch fails its requests, never the server
                log.exception("batch of %d requests failed", len(batch))
                for j in batch:
                    j.emit(("error", f"decoding failed: {type(ex).__name__}: {ex}", None))
            finally:
                with e._cond:
                    e._busy = False
                    self.idle_since = time.monotonic()

    def decode(self, batch: list[Any]) -> None:
        """Decode one batch to the end of its longest reply; report tokens, finished choices and the batch's stats
        (``tokens``: new tokens decoded, which a cancelled batch keeps short)."""
        e = self.e
        owner = [(j, c) for j in batch for c in range(len(j.pairs))]
        pairs = [p for j in batch for p in j.pairs]
        for j in batch:
            j.results = [None] * len(j.pairs)
        t0 = time.perf_counter()

        def on_token(i: int, tok: int) -> None:
            j, c = owner[i]
            if j.stream:
                j.emit(("token", c, tok))

        def on_finish(i: int, res: PairResult) -> None:
            j, c = owner[i]
            j.results[c] = res
            j.emit(("finish", c, res))
            if all(r is not None for r in j.results):
                if j.cancelled.is_set():
                    e.stats["cancelled"] += 1
                j.emit(("done", None, None))

        def cancelled(i: int) -> bool:
            return owner[i][0].cancelled.is_set() or e._cancel_inflight

        key = batch[0].key
        generate_pairs(e.ens, e.adapters, key.removesuffix("+base"), pairs, anchored=key.endswith("+base"),
                       on_token=on_token, on_finish=on_finish, cancelled=cancelled,
                       max_prompt_tokens=e.prompt_limit)
        st = e.stats
        st["batches"] += 1
        st["jobs"] += len(batch)
        st["pairs"] += len(pairs)
        st["max_batch_jobs"] = max(st["max_batch_jobs"], len(batch))
        tokens = sum(len(r.token_ids) for j in batch for r in j.results if r is not None)
        st["last_batch"] = {"key": key, "jobs": len(batch), "pairs": len(pairs), "rows": self.rows(batch),
                            "tokens": tokens, "seconds": round(time.perf_counter() - t0, 4)}
