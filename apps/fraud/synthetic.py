"""Synthetic card transactions with known fraud scenarios (handbook-like columns).

Why a generator: real fraud sets are either anonymised beyond feature engineering (ULB) or
big (the handbook set, 1.75M rows); a small, seeded set with the same column names lets
tests and the demo run the whole pipeline in seconds, and its ``TX_FRAUD_SCENARIO``
column says which pattern each fraud follows.

Legitimate behaviour follows the handbook's simulator: customers and terminals sit on a
100 x 100 grid; a customer pays at terminals within a radius of home, a Poisson number of
times a day, around midday (times falling outside the day are dropped), with a normal
amount around a personal mean. Fraud scenarios:

1. card testing: a stolen card is probed with a burst of small online payments minutes
   apart at terminals the customer never uses;
2. compromised terminal: a skimmed terminal turns every transaction on it into fraud for
   ``terminal_days`` days (no per-transaction signal: only terminal history reveals it);
3. account takeover: for ``takeover_days`` days about a third of a customer's payments are
   made by the fraudster: much larger amounts, far-away terminals, any hour, mostly online.

Output is deterministic for a given :class:`SyntheticConfig` (numpy ``default_rng(seed)``).
``TX_FRAUD_SCENARIO`` (0 = legitimate) is an answer key: never use it as a feature.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from apps.fraud.errors import FraudConfigError

SECONDS_PER_DAY = 86_400
CHANNELS = ("chip", "contactless", "online")
MERCHANT_CATEGORIES = (
    "grocery",
    "fuel",
    "restaurant",
    "retail",
    "travel",
    "electronics",
    "digital",
)
_CATEGORY_P = (0.30, 0.12, 0.18, 0.20, 0.05, 0.08, 0.07)
CONTACTLESS_LIMIT = 50.0
LEGIT, CARD_TESTING, COMPROMISED_TERMINAL, ACCOUNT_TAKEOVER = 0, 1, 2, 3
SCENARIOS = {
    LEGIT: "legitimate",
    CARD_TESTING: "card testing",
    COMPROMISED_TERMINAL: "compromised terminal",
    ACCOUNT_TAKEOVER: "account takeover",
}


@dataclass
class SyntheticConfig:
    """Size, seed and fraud-scenario rates (incidents per day per 1000 customers/terminals).

    The default rates give a fraud rate of about 1 % for any size.
    """

    n_customers: int = 700
    n_terminals: int = 1000
    n_days: int = 60
    start_date: str = "2018-04-01"
    seed: int = 0
    terminals_per_customer: float = 20.0  # expected terminals within a customer's radius
    card_testing_per_1k_customers: float = 1.1
    card_testing_burst: tuple[int, int] = (3, 8)
    terminal_compromise_per_1k_terminals: float = 0.3
    terminal_days: int = 14
    takeover_per_1k_customers: float = 1.4
    takeover_days: int = 7

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_days"):
            if getattr(self, name) < 1:
                raise FraudConfigError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.card_testing_burst
        if not 1 <= lo <= hi:
            raise FraudConfigError(f"card_testing_burst must be 1 <= lo <= hi, got {(lo, hi)}")


def _terminal_lists(
    cust_xy: np.ndarray, term_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, indices) of the terminals each customer uses: those within ``radius``,
    or the 3 nearest when none is that close. Chunked so memory stays O(chunk * T)."""
    lists = []
    for start in range(0, len(cust_xy), 256):
        d = np.linalg.norm(cust_xy[start : start + 256, None, :] - term_xy[None, :, :], axis=-1)
        for row in d:
            near = np.flatnonzero(row < radius)
            lists.append(near if len(near) else np.argsort(row, kind="stable")[:3])
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    return offsets, np.concatenate(lists)


def _pick(
    rng: np.random.Generator, offsets: np.ndarray, flat: np.ndarray, cust: np.ndarray
) -> np.ndarray:
    """One random terminal from each customer's list."""
    sizes = offsets[cust + 1] - offsets[cust]
    return flat[offsets[cust] + (rng.random(len(cust)) * sizes).astype(np.int64)]


def _far_terminals(
    rng: np.random.Generator,
    cust: np.ndarray,
    offsets: np.ndarray,
    flat: np.ndarray,
    n_terminals: int,
) -> np.ndarray:
    """Random terminals, redrawn (a few times) while they are in the customer's own list."""
    term = rng.integers(0, n_terminals, len(cust))
    for _ in range(4):
        own = np.array(
            [t in flat[offsets[c] : offsets[c + 1]] for c, t in zip(cust, term, strict=True)],
            dtype=bool,
        )
        if not own.any():
            break
        term[own] = rng.integers(0, n_terminals, int(own.sum()))
    return term


def _channel(rng: np.random.Generator, online_p: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """0 chip, 1 contactless, 2 online; contactless only up to the contactless limit."""
    u = rng.random(len(amount))
    ch = np.where(u < online_p, 2, np.where(rng.random(len(amount)) < 0.5, 0, 1))
    ch[(ch == 1) & (amount > CONTACTLESS_LIMIT)] = 0
    return ch


def generate_transactions(cfg: SyntheticConfig | None = None) -> pl.DataFrame:
    """Transactions sorted by time, with handbook column names plus channel and category."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    C, T, D = cfg.n_customers, cfg.n_terminals, cfg.n_days

    # Customer and terminal profiles.
    cust_xy = rng.uniform(0, 100, (C, 2))
    cust_mean = rng.uniform(5, 100, C)
    cust_std = cust_mean / 2
    cust_rate = rng.uniform(0, 4, C)  # transactions per day
    cust_online = rng.beta(2, 6, C)
    term_xy = rng.uniform(0, 100, (T, 2))
    term_cat = rng.choice(len(MERCHANT_CATEGORIES), T, p=_CATEGORY_P)
    radius = float(np.sqrt(cfg.terminals_per_customer * 100 * 100 / (np.pi * T)))
    offsets, flat = _terminal_lists(cust_xy, term_xy, radius)

    # Legitimate transactions: Poisson count per customer-day, time around midday.
    counts = rng.poisson(np.repeat(cust_rate[:, None], D, axis=1))
    cust = np.repeat(np.repeat(np.arange(C), D), counts.ravel())
    day = np.repeat(np.tile(np.arange(D), C), counts.ravel())
    sec = rng.normal(SECONDS_PER_DAY / 2, 20_000, len(cust))
    inside = (sec >= 0) & (sec < SECONDS_PER_DAY)  # like the handbook: drop, do not clip
    cust, day, sec = cust[inside], day[inside], sec[inside]
    n = len(cust)
    t = day * SECONDS_PER_DAY + sec.astype(np.int64)
    amount = rng.normal(cust_mean[cust], cust_std[cust])
    neg = amount <= 0
    amount[neg] = rng.uniform(0, 2 * cust_mean[cust[neg]])
    amount = np.maximum(np.round(amount, 2), 0.01)
    term = _pick(rng, offsets, flat, cust)
    channel = _channel(rng, cust_online[cust], amount)
    scenario = np.zeros(n, dtype=np.int8)

    # Scenario 2: compromised terminals (all their transactions for terminal_days days).
    n_comp = rng.poisson(cfg.terminal_compromise_per_1k_terminals * T / 1000, D)
    for d in range(D):
        for tid in rng.choice(T, n_comp[d], replace=False) if n_comp[d] else ():
            lo, hi = (d + 1) * SECONDS_PER_DAY, (d + 1 + cfg.terminal_days) * SECONDS_PER_DAY
            hit = (term == tid) & (t >= lo) & (t < hi) & (scenario == LEGIT)
            scenario[hit] = COMPROMISED_TERMINAL

    # Scenario 3: account takeover (a third of the customer's payments for takeover_days).
    n_ato = rng.poisson(cfg.takeover_per_1k_customers * C / 1000, D)
    for d in range(D):
        for cid in rng.choice(C, n_ato[d], replace=False) if n_ato[d] else ():
            lo, hi = (d + 1) * SECONDS_PER_DAY, (d + 1 + cfg.takeover_days) * SECONDS_PER_DAY
            idx = np.flatnonzero((cust == cid) & (t >= lo) & (t < hi) & (scenario == LEGIT))
            idx = idx[rng.random(len(idx)) < 1 / 3]
            if not len(idx):
                continue
            scenario[idx] = ACCOUNT_TAKEOVER
            amount[idx] = np.round(amount[idx] * rng.uniform(3, 8, len(idx)) + 50, 2)
            term[idx] = _far_terminals(rng, cust[idx], offsets, flat, T)
            t[idx] = (t[idx] // SECONDS_PER_DAY) * SECONDS_PER_DAY + rng.integers(
                0, SECONDS_PER_DAY, len(idx)
            )
            channel[idx] = np.where(rng.random(len(idx)) < 0.7, 2, 0)

    # Scenario 1: card testing bursts (extra transactions appended).
    n_ct = rng.poisson(cfg.card_testing_per_1k_customers * C / 1000, D)
    extra: list[tuple[np.ndarray, ...]] = []
    lo_b, hi_b = cfg.card_testing_burst
    for d in range(D):
        for cid in rng.choice(C, n_ct[d], replace=False) if n_ct[d] else ():
            k = int(rng.integers(lo_b, hi_b + 1))
            start = d * SECONDS_PER_DAY + int(rng.integers(0, SECONDS_PER_DAY))
            bt = start + np.cumsum(rng.exponential(90.0, k)).astype(np.int64)
            bc = np.full(k, cid)
            ba = np.round(rng.uniform(0.5, 5.0, k), 2)
            bterm = _far_terminals(rng, bc, offsets, flat, T)
            extra.append((bc, bt, ba, bterm, np.full(k, 2), np.full(k, CARD_TESTING, np.int8)))
    if extra:
        cust, t, amount, term, channel, scenario = (
            np.concatenate([base, *parts])
            for base, parts in zip(
                (cust, t, amount, term, channel, scenario), zip(*extra, strict=True), strict=True
            )
        )

    order = np.lexsort((np.arange(len(t)), t))
    t = t[order]
    start = datetime.fromisoformat(cfg.start_date)
    frame = pl.DataFrame(
        {
            "TRANSACTION_ID": np.arange(len(t), dtype=np.int64),
            "TX_DATETIME": pl.Series(t * 1_000_000, dtype=pl.Int64).cast(pl.Datetime("us"))
            + (start - datetime(1970, 1, 1)),
            "CUSTOMER_ID": cust[order].astype(np.int64),
            "TERMINAL_ID": term[order].astype(np.int64),
            "TX_AMOUNT": amount[order].astype(np.float64),
            "TX_TIME_SECONDS": t.astype(np.int64),
            "TX_TIME_DAYS": (t // SECONDS_PER_DAY).astype(np.int64),
            "TX_CHANNEL": np.array(CHANNELS)[channel[order]],
            "MERCHANT_CATEGORY": np.array(MERCHANT_CATEGORIES)[term_cat[term[order]]],
            "TX_FRAUD": (scenario[order] != LEGIT).astype(np.int8),
            "TX_FRAUD_SCENARIO": scenario[order].astype(np.int8),
        }
    )
    return frame


def write_frame(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write ``.csv`` or Parquet (any other suffix) atomically: a temp file in the same
    folder, then ``os.replace``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix.lower() == ".csv":
            frame.write_csv(tmp)
        else:
            frame.write_parquet(tmp, compression="zstd", statistics=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


write_parquet = write_frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m apps.fraud.synthetic", description="Write synthetic card transactions."
    )
    parser.add_argument("--out", required=True, help="output .parquet (or .csv) path")
    parser.add_argument("--days", type=int, default=SyntheticConfig.n_days)
    parser.add_argument("--customers", type=int, default=SyntheticConfig.n_customers)
    parser.add_argument("--terminals", type=int, default=None, help="default: 10/7 x customers")
    parser.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    parser.add_argument("--start-date", default=SyntheticConfig.start_date)
    args = parser.parse_args(argv)
    terminals = args.terminals or max(1, round(args.customers * 10 / 7))
    cfg = SyntheticConfig(
        n_customers=args.customers,
        n_terminals=terminals,
        n_days=args.days,
        seed=args.seed,
        start_date=args.start_date,
    )
    frame = generate_transactions(cfg)
    out = write_frame(frame, args.out)
    counts = frame["TX_FRAUD_SCENARIO"].value_counts().sort("TX_FRAUD_SCENARIO")
    parts = ", ".join(f"{SCENARIOS[s]}={c}" for s, c in counts.iter_rows())
    print(
        f"wrote {out}: {frame.height} transactions, {cfg.n_customers} customers, "
        f"{cfg.n_terminals} terminals, {cfg.n_days} days, fraud rate "
        f"{frame['TX_FRAUD'].mean():.4f} ({parts})"
    )


if __name__ == "__main__":
    main()
