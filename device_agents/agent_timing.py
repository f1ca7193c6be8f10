"""The timing protocol of the edgenas agent (stdlib only; Python 3.8+).

Warm-up, then timed runs until a minimum count and duration are met and the 95% confidence
interval of the median is within a target relative half-width, or a time cap is hit. The
median's interval is distribution-free: the order statistics at ranks n/2 -+ 1.96 sqrt(n)/2
(binomial, normal approximation), so it holds for the skewed, heavy-tailed latencies that
boards produce."""

import bisect
import math
import time

# Two-sided 97.5% Student t quantiles by degrees of freedom: the CI of a level estimated from
# a few sessions' medians (their spread, not the pooled runs', is the median's variance).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


class TimingPolicy(object):
    def __init__(self, warmup_runs=3, warmup_s=0.2, min_runs=10, min_time_s=1.0, max_time_s=20.0,
                 max_runs=100000, target_rel_ci=0.02, unstable_cov=0.10, sessions=1):
        self.warmup_runs = int(warmup_runs)
        self.warmup_s = float(warmup_s)
        self.min_runs = max(3, int(min_runs))
        self.min_time_s = float(min_time_s)
        self.max_time_s = float(max_time_s)
        self.max_runs = int(max_runs)
        self.target_rel_ci = float(target_rel_ci)
        self.unstable_cov = float(unstable_cov)
        # Fresh sessions the cell's time is split over: each load places the weights anew,
        # and a decode step's median moves with that placement (see ``per_session``).
        self.sessions = max(1, int(sessions))

    @classmethod
    def from_dict(cls, d):
        d = dict(d or {})
        allowed = ("warmup_runs", "warmup_s", "min_runs", "min_time_s", "max_time_s", "max_runs",
                   "target_rel_ci", "unstable_cov", "sessions")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError("unknown timing settings: %s" % ", ".join(unknown))
        return cls(**d)

    def to_dict(self):
        return dict(self.__dict__)

    def per_session(self):
        """The policy of one of ``sessions`` sessions: the cell's time split between them.

        On this box a decode cell re-measured in a later sweep moved by 3.0% (sd, 32 cells;
        84% within ±5%) although within a session its median's CI was under 1%: the session
        (where its weights landed in memory) sets the level. Averaging over k sessions
        shrinks that by sqrt(k) for the price of k - 1 loads, the timed seconds unchanged."""
        d = self.to_dict()
        d.update(min_time_s=self.min_time_s / self.sessions, max_time_s=self.max_time_s / self.sessions,
                 min_runs=max(3, self.min_runs // self.sessions), sessions=1)
        return TimingPolicy(**d)


def percentile(sorted_x, q):
    """Linear-interpolated percentile of an already sorted list (q in 0..100)."""
    if not sorted_x:
        return float("nan")
    pos = (len(sorted_x) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def median_ci(sorted_x, z=1.96):
    """(low, high) bounds of the ~95% confidence interval of the median."""
    n = len(sorted_x)
    if n < 3:
        return sorted_x[0], sorted_x[-1]
    half = z * math.sqrt(n) / 2.0
    # 1-based ranks j = n/2 - half and k = 1 + n/2 + half, as 0-based indices
    lo = max(0, math.floor(n / 2.0 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2.0 + half))
    return sorted_x[lo], sorted_x[hi]


def summarize(times_s, unstable_cov=0.10):
    """Statistics in milliseconds of a list of run times in seconds."""
    ms = sorted(t * 1000.0 for t in times_s)
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / (n - 1)) if n > 1 else 0.0
    med = percentile(ms, 50)
    lo, hi = median_ci(ms)
    cov = std / mean if mean > 0 else 0.0
    # Dispersion that a few scheduler hiccups cannot inflate: 1.4826 * MAD / median equals the
    # CoV for normal noise, but ignores the rare 10x outliers of a shared or busy board.
    mad = percentile(sorted(abs(x - med) for x in ms), 50)
    robust_cov = 1.4826 * mad / med if med > 0 else 0.0
    return {
        "n": n,
        "median_ms": med,
        "mean_ms": mean,
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "std_ms": std,
        "cov": cov,
        "median_ci_low_ms": lo,
        "median_ci_high_ms": hi,
        "median_rel_ci": (hi - lo) / 2.0 / med if med > 0 else 0.0,
        "robust_cov": robust_cov,
        "unstable": robust_cov > unstable_cov,
    }


def t975(df):
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (conservative between
    tabulated values; 1.96 beyond 30)."""
    if df > 30:
        return 1.96
    return T975[min(k for k in T975 if k >= df)]


def sessions_ci(session_medians):
    """(level, relative half-width of its 95% CI) from per-session medians: the mean of the
    medians and Student's t over their spread. Runs within a session are not independent
    draws of the cell's level: where the session's weights landed sets it."""
    k = len(session_medians)
    level = sum(session_medians) / k
    if k < 2 or level <= 0:
        return level, float("inf")
    sd = math.sqrt(sum((m - level) ** 2 for m in session_medians) / (k - 1))
    return level, t975(k - 1) * sd / math.sqrt(k) / level


class SortedRuns(object):
    """Run times kept sorted as they arrive (binary insertion), so the stopping rule reads
    the median's interval without re-sorting every run after each one."""

    def __init__(self):
        self.values = []

    def add(self, x):
        bisect.insort(self.values, x)

    def __len__(self):
        return len(self.values)

    def rel_ci(self):
        return rel_median_ci(self.values)


def rel_median_ci(sorted_x):
    """Half-width of the median's 95% interval relative to the median, of a sorted list."""
    med = percentile(sorted_x, 50)
    lo, hi = median_ci(sorted_x)
    return (hi - lo) / 2.0 / med if med > 0 else float("inf")


def _stop(runs, n, elapsed, policy):
    """Why to stop timing now ("converged", "time_cap"), or None to go on; ``runs`` is the
    SortedRuns whose median must converge (the times, or a paired cell's ratios)."""
    if n >= policy.min_runs and len(runs) >= 3 and elapsed >= policy.min_time_s:
        if runs.rel_ci() <= policy.target_rel_ci:
            return "converged"
    if elapsed >= policy.max_time_s and n >= 3:
        return "time_cap"
    return None


def run_protocol(fn, policy, clock=time.perf_counter, timed=None):
    """Time ``fn()`` under ``policy``. Returns (run times in seconds, stop reason).

    ``timed``, when given, runs once and returns its own duration in seconds (a GPU
    back-end's CUDA-event time), used instead of the host clock around ``fn``."""
    start = clock()
    done = 0
    while done < policy.warmup_runs or clock() - start < policy.warmup_s:
        fn()
        done += 1
        if clock() - start > policy.max_time_s / 2:
            break  # a model so slow that warm-up eats half the cap: measure what is left
    times = []
    runs = SortedRuns()
    elapsed = 0.0  # timed seconds: the bookkeeping between runs is not counted
    reason = "max_runs"
    while len(times) < policy.max_runs:
        if timed is not None:
            t = timed()
        else:
            a = clock()
            fn()
            t = clock() - a
        times.append(t)
        runs.add(t)
        elapsed += t
        reason = _stop(runs, len(times), elapsed, policy)
        if reason:
            break
    return times, reason or "max_runs"


def run_paired(fn, companion, policy, clock=time.perf_counter, max_block=64):
    """Time ``fn()`` and a fixed ``companion()`` alternately under ``policy`` (convergence
    judged on the median ratio, the number a paired cell reports). Returns (fn's times,
    companion's times, per-step ratios, stop reason).

    A shared board slows every model at once (other tenants' memory traffic, clocks, heat)
    in phases of seconds to minutes. Adjacent runs see the same phase, so their ratio
    cancels it: on this box, over 1 s windows, a decode step's median spread 1.9% alone and
    its ratio to an interleaved companion 0.7%. Each step runs ``fn`` k times, k the
    companion's warm-up time over ``fn``'s (at most ``max_block``), then the companion once:
    a 4 ms cell beside a 140 ms companion would otherwise get a few dozen runs in its time."""
    start = clock()
    done = 0
    ta, tb = [], []
    while done < policy.warmup_runs or clock() - start < policy.warmup_s:
        a = clock()
        fn()
        b = clock()
        companion()
        ta.append(b - a)
        tb.append(clock() - b)
        done += 1
        if clock() - start > policy.max_time_s / 2:
            break
    med_a, med_b = percentile(sorted(ta), 50), percentile(sorted(tb), 50)
    k = int(max(1, min(max_block, round(med_b / med_a)))) if med_a > 0 else 1
    times, other, ratios = [], [], []
    sorted_ratios = SortedRuns()
    elapsed = 0.0
    reason = None
    while len(times) < policy.max_runs:
        block = []
        for _ in range(k):
            a = clock()
            fn()
            block.append(clock() - a)
        b = clock()
        companion()
        c = clock()
        times.extend(block)
        other.append(c - b)
        elapsed += sum(block) + (c - b)
        if c - b > 0:
            ratios.append(sum(block) / len(block) / (c - b))
            sorted_ratios.add(ratios[-1])
        reason = _stop(sorted_ratios, len(times), elapsed, policy)
        if reason:
            break
    return times, other, ratios, reason or "max_runs"
