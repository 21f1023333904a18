"""Rate-limit decisions: GCRA (the generic cell rate algorithm) for requests and tokens per minute.

Pure: no I/O, time is an argument. The gateway's in-process store calls `decide` directly;
the Redis store runs `LUA_SCRIPT`, a line-for-line mirror of `decide`, so that replicas
sharing one Redis take one atomic decision per request in one round trip.

The model. A limit of L units per minute is a bucket of `capacity` units that refills
continuously at L/60 units per second (capacity is L when `burst_seconds` is 60, the
default: the whole minute's budget may be spent at once, as OpenAI's limits behave).
GCRA stores one number per bucket, its theoretical arrival time `tat`; the bucket's level
is `(now + tau - max(tat, now)) / interval`, with interval = 60/L seconds per unit and
tau = capacity * interval. A request of cost c passes when c <= level, i.e. when
`max(tat, now) + c * interval - tau <= now`, and then tat advances by c * interval.

A decision covers several buckets (a key's RPM and TPM, its tenant's RPM and TPM): it passes
only if every bucket has room, and then takes from all of them; otherwise it takes nothing
(the tighter limit wins). `adjust` later charges or refunds the difference between tokens
reserved up front and tokens used; a bucket may go into debt (tat beyond now + tau), which
delays the next request, but a refund never fills it beyond its capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Slack for float rounding, in seconds (on the allow test) and in units (on `remaining`):
# absolute times near 1.7e9 s carry about 2.4e-7 s of rounding per operation.
EPS = 1e-6
PERIOD_S = 60.0


@dataclass(frozen=True)
class Rate:
    """L units per minute with a bucket of `capacity` units, in GCRA's terms."""

    limit: int  # units per minute, the number reported as x-ratelimit-limit-*
    interval: float  # seconds per unit
    tau: float  # seconds: capacity * interval

    @classmethod
    def per_minute(cls, limit: int, burst_seconds: float = PERIOD_S) -> Rate:
        if limit < 1:
            raise ValueError("a limit must be at least 1 per minute")
        interval = PERIOD_S / limit
        capacity = max(1.0, limit * burst_seconds / PERIOD_S)
        return cls(limit=limit, interval=interval, tau=capacity * interval)

    @property
    def capacity(self) -> float:
        return self.tau / self.interval


@dataclass(frozen=True)
class BucketState:
    """One bucket after a decision: units left and seconds until it is full again."""

    remaining: int
    reset_after: float


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until the denied request would pass; 0 when allowed
    denied_by: int | None  # index of the bucket that needs the longest wait, when denied
    buckets: tuple[BucketState, ...]
    tats: tuple[float | None, ...]  # the new tat per bucket; None = leave the stored value


def _state(rate: Rate, new_tat: float, now: float) -> BucketState:
    remaining = math.floor((now + rate.tau - new_tat) / rate.interval + EPS)
    return BucketState(remaining=max(0, remaining), reset_after=max(0.0, new_tat - now))


def decide(tats: list[float | None], rates: list[Rate], costs: list[float], now: float) -> Decision:
    """Take `costs[i]` units from every bucket i, or nothing if any bucket lacks room.

    `tats[i]` is the stored tat (None: never used, i.e. full). A cost of 0 never denies and
    changes nothing (a peek for headers).
    """
    current = [now if t is None or t < now else t for t in tats]
    retry_after, denied_by = 0.0, None
    for i, (tat, rate, cost) in enumerate(zip(current, rates, costs)):
        if cost > 0:
            allow_at = tat + cost * rate.interval - rate.tau
            if allow_at > now + EPS and allow_at - now > retry_after:
                retry_after, denied_by = allow_at - now, i
    allowed = denied_by is None
    new_tats: list[float | None] = []
    states = []
    for tat, rate, cost in zip(current, rates, costs):
        if allowed and cost > 0:
            tat = tat + cost * rate.interval
            new_tats.append(tat)
        else:
            new_tats.append(None)
        states.append(_state(rate, tat, now))
    return Decision(allowed, retry_after, denied_by, tuple(states), tuple(new_tats))


def adjust(tat: float | None, rate: Rate, delta: float, now: float) -> float:
    """Charge (delta > 0) or refund (delta < 0) units after the fact; the new tat."""
    current = now if tat is None or tat < now else tat
    return max(current + delta * rate.interval, now)


# The Redis mirror of `decide` and `adjust`: same formulas, same order of float operations.
# KEYS: the n bucket keys, then (when ARGV[2] == '1') the key record to check for revocation.
# ARGV: mode ('take' | 'adjust'), check_revoked ('0' | '1'), now ('' = the server's TIME),
#       then interval, tau, cost for each bucket (cost: the delta in 'adjust' mode).
# Returns {-1} when the key is revoked or deleted; else
#   {allowed, retry_after, denied_by (0 = none, else 1-based), remaining_1, reset_1, ...}.
# Floats go back as strings: Redis would truncate Lua numbers to integers.
LUA_SCRIPT = """
local EPS = 1e-6
local mode = ARGV[1]
local n = #KEYS
if ARGV[2] == '1' then
  n = n - 1
  local revoked = redis.call('HGET', KEYS[#KEYS], 'revoked')
  if revoked == false or revoked == '1' then return {-1} end
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
local tats, intervals, taus, costs = {}, {}, {}, {}
local retry_after, denied_by = 0, 0
for i = 1, n do
  intervals[i] = tonumber(ARGV[3 * i + 1])
  taus[i] = tonumber(ARGV[3 * i + 2])
  costs[i] = tonumber(ARGV[3 * i + 3])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  if mode == 'take' and costs[i] > 0 then
    local allow_at = tat + costs[i] * intervals[i] - taus[i]
    if allow_at > now + EPS and allow_at - now > retry_after then
      retry_after = allow_at - now
      denied_by = i
    end
  end
end
local out = {denied_by == 0 and 1 or 0, fmt(retry_after), denied_by}
for i = 1, n do
  local tat = tats[i]
  local write = false
  if mode == 'adjust' then
    tat = math.max(tat + costs[i] * intervals[i], now)
    write = true
  elseif denied_by == 0 and costs[i] > 0 then
    tat = tat + costs[i] * intervals[i]
    write = true
  end
  if write then
    redis.call('SET', KEYS[i], fmt(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  end
  local remaining = math.floor((now + taus[i] - tat) / intervals[i] + EPS)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = fmt(math.max(0, tat - now))
end
return out
"""
