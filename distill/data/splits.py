"""Leave-one-domain-out splits (DomainBed protocol) and the per-domain minibatch stream."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .images import ImageSet


@dataclass
class Splits:
    """Row indices into an ImageSet. ``val`` and ``test_out`` are the holdout ("out") parts of their domains."""

    source_domains: list[str]          # every domain but the test domain, in spec order (= batch order)
    test_domain: str
    train: dict[str, torch.Tensor]     # source domain -> in-split indices (long, ascending)
    val: dict[str, torch.Tensor]       # source domain -> out-split indices: model selection
    test_in: torch.Tensor              # test domain in-split: the reported accuracy
    test_out: torch.Tensor             # test domain out-split: oracle selection only
    split_hash: str
    lodo_domain: str | None = None     # a source domain also held out of training (DomainBed's LODO runs)
    lodo_in: torch.Tensor | None = None   # its in-split: the LODO validation accuracy

    def counts(self) -> dict[str, int]:
        """Sizes of every part, e.g. {"train/photo": 320, "val/photo": 80, ..., "test_in": 400, "test_out": 100}."""
        out = {f"train/{d}": len(self.train[d]) for d in self.source_domains}
        out.update({f"val/{d}": len(self.val[d]) for d in self.source_domains})
        out.update(test_in=len(self.test_in), test_out=len(self.test_out))
        return out


def _rank_key(seed: int, relpath: str) -> bytes:
    return hashlib.sha256(f"{seed}:{relpath}".encode()).digest()


def holdout(paths: list[str], indices: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``indices`` (rows of ``paths``) into (in, out): out = the round(fraction * n) rows whose
    sha256(f"{seed}:{path}") ranks first. Depends only on (seed, paths), never on row or file-system order."""
    rows = indices.tolist()
    ranked = sorted(rows, key=lambda i: _rank_key(seed, paths[i]))
    n_out = round(fraction * len(rows))
    out = sorted(ranked[:n_out])
    inn = sorted(ranked[n_out:])
    return torch.tensor(inn, dtype=torch.long), torch.tensor(out, dtype=torch.long)


def _hash(parts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for key, idx in parts.items():
        h.update(f"{key}:{','.join(map(str, idx.tolist()))}\n".encode())
    return h.hexdigest()


def make_splits(images: ImageSet, test_domain: str, holdout_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Hold out ``test_domain``; split every domain into in/out parts of (1 - fraction, fraction)."""
    domains = images.spec.domains
    if test_domain not in domains:
        raise ValueError(f"unknown test domain {test_domain!r} for dataset {images.spec.name}; "
                         f"valid: {', '.join(domains)}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1); got {holdout_fraction}")
    parts = {}
    for domain in domains:
        idx = images.domain_indices(domain)
        if len(idx) == 0:
            raise ValueError(f"domain {domain!r} of dataset {images.spec.name} has no images")
        parts[domain] = holdout(images.paths, idx, holdout_fraction, seed)
    sources = [d for d in domains if d != test_domain]
    train = {d: parts[d][0] for d in sources}
    val = {d: parts[d][1] for d in sources}
    empty = [d for d in sources if len(train[d]) == 0]
    if empty:
        raise ValueError(f"no training images left in source domain(s) {', '.join(empty)} "
                         f"after holding out {holdout_fraction:.0%}")
    test_in, test_out = parts[test_domain]
    named = {**{f"train/{d}": train[d] for d in sources}, **{f"val/{d}": val[d] for d in sources},
             f"test_in/{test_domain}": test_in, f"test_out/{test_domain}": test_out}
    return Splits(sources, test_domain, train, val, test_in, test_out, _hash(named))


def hold_out_source(splits: Splits, domain: str) -> Splits:
    """DomainBed's leave-one-domain-out run: ``domain``, a source domain, is held out of training too (with the test
    domain, as DomainBed's runs with test_envs [test, domain]); its in-split becomes ``lodo_in``, on which the LODO
    selection measures the model."""
    if domain not in splits.source_domains:
        raise ValueError(f"lodo domain {domain!r} is not a source domain of this split ({splits.source_domains})")
    if len(splits.source_domains) < 3:
        raise ValueError("leave-one-domain-out selection needs at least 2 source domains left for training")
    sources = [d for d in splits.source_domains if d != domain]
    train = {d: splits.train[d] for d in sources}
    val = {d: splits.val[d] for d in sources}
    named = {**{f"train/{d}": train[d] for d in sources}, **{f"val/{d}": val[d] for d in sources},
             f"test_in/{splits.test_domain}": splits.test_in, f"test_out/{splits.test_domain}": splits.test_out,
             f"lodo_in/{domain}": splits.train[domain]}
    return Splits(sources, splits.test_domain, train, val, splits.test_in, splits.test_out, _hash(named),
                  lodo_domain=domain, lodo_in=splits.train[domain])


def _stream_seed(seed: int, rank: int, domain: str, epoch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{domain}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DomainBatches:
    """Infinite stream of index tensors: ``batch_size`` rows from each source domain, concatenated in
    ``splits.source_domains`` order (``domain_of_batch`` gives each row's position in that list).

    Each domain is read through one random permutation per epoch (without replacement; a batch that crosses an
    epoch boundary continues into the next permutation). Batch ``t`` is a pure function of (seed, rank, t), so
    ``state_dict`` is the step count and a resumed stream continues exactly where it stopped.
    """

    def __init__(self, splits: Splits, batch_size: int, seed: int, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.domains = list(splits.source_domains)
        self.pools = [splits.train[d] for d in self.domains]
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.split_hash = splits.split_hash
        self.step = 0
        self.domain_of_batch = torch.arange(len(self.domains)).repeat_interleave(self.batch_size)
        self._perms: list[dict[int, torch.Tensor]] = [{} for _ in self.domains]

    def _perm(self, k: int, epoch: int) -> torch.Tensor:
        cache = self._perms[k]
        if epoch not in cache:
            g = torch.Generator().manual_seed(_stream_seed(self.seed, self.rank, self.domains[k], epoch))
            cache[epoch] = self.pools[k][torch.randperm(len(self.pools[k]), generator=g)]
            for old in [e for e in cache if e < epoch - 1]:
                del cache[old]
        return cache[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """The index tensor [len(source_domains) * batch_size] of step ``step``."""
        parts = []
        for k, pool in enumerate(self.pools):
            n, pos, end = len(pool), step * self.batch_size, (step + 1) * self.batch_size
            while pos < end:
                epoch, offset = divmod(pos, n)
                take = min(end - pos, n - offset)
                parts.append(self._perm(k, epoch)[offset:offset + take])
                pos += take
        return torch.cat(parts)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        """The step count plus what must match on resume; the same for every rank, so rank 0's state resumes all."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "split_hash": self.split_hash}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = [k for k in ("seed", "batch_size", "split_hash") if state.get(k) != mine[k]]
        if diff:
            raise ValueError("cannot resume a DomainBatches stream with different " + ", ".join(
                f"{k} ({state.get(k)!r} saved, {mine[k]!r} now)" for k in diff))
        self.step = int(state["step"])
