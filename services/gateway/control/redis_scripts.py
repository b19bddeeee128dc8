"""The Lua scripts of the Redis control store, and the Redis keys they keep.

Each step of the store is one script, atomic by itself, in Redis server time. The key names and
layouts below are a contract between gateway releases: replicas of two releases share one Redis
during a rolling upgrade, so they change only together with a migration.
"""

from __future__ import annotations

RATE_LIMIT_PREFIX = "meshserve:ratelimit"
BUDGET_PREFIX = "meshserve:budget"


def rate_limit_keys(key_id: str) -> list[str]:
    """An API key's rate-limit keys (one hash tag, the key id: one cluster slot). Times in ms.
    requests  sorted set: member = request, score = when it was admitted
    tokens    hash: i = minute index, p = previous minute's count, c = this minute's
    inflight  sorted set: member = slot, score = lease deadline"""
    base = f"{RATE_LIMIT_PREFIX}:{{{key_id}}}"
    return [f"{base}:requests", f"{base}:tokens", f"{base}:inflight"]


def budget_keys(key_id: str, period: str) -> list[str]:
    """A key's budget keys of one period (one hash tag: one cluster slot). Amounts in nano-dollars,
    as integer strings (the scripts never read them into Lua's doubles, exact only to 2**53).
    totals  hash: spent, reserved
    open    sorted set: member = hold id, score = lease deadline (ms)
    held    hash: hold id -> nano-dollars held
    legacy  the totals hash of releases before (micro-dollars; only read: see SEED)"""
    base = f"{BUDGET_PREFIX}:{{{key_id}:{period}}}"
    return [f"{base}:nano:totals", f"{base}:nano:open", f"{base}:nano:held", f"{base}:totals"]


# -- rate limits: the same steps as the in-process store's ----------------------------------------
_REDIS_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = 60000
local into = now % window
local index = math.floor(now / window)
local function tokens_counter()
  local h = redis.call('HMGET', KEYS[2], 'i', 'p', 'c')
  local stored = tonumber(h[1])
  if stored == index then return tonumber(h[2]) or 0, tonumber(h[3]) or 0 end
  if stored == index - 1 then return tonumber(h[3]) or 0, 0 end
  return 0, 0
end
"""
# KEYS: requests, tokens, inflight. ARGV: rpm, tpm, concurrent (-1: no limit), tokens needed, slot id,
# slot lease ms. Returns {verdict, requests, ms until the oldest leaves, previous, current, ms into
# the minute, in flight}.
ADMIT = (
    _REDIS_CLOCK
    + """
local rpm, tpm, concurrent, needed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local previous, current = 0, 0
if tpm >= 0 then previous, current = tokens_counter() end
local count = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  count = redis.call('ZCARD', KEYS[1])
end
local in_flight = 0
if concurrent >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[3])
end
local verdict = 'ok'
if tpm >= 0 and tpm - math.floor(previous * (window - into) / window + current) < needed then
  verdict = 'tokens'
elseif concurrent >= 0 and in_flight >= concurrent then
  verdict = 'concurrent'
elseif rpm >= 0 and count >= rpm then
  verdict = 'requests'
end
if verdict == 'ok' then
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[5])
    redis.call('PEXPIRE', KEYS[1], window)
    count = count + 1
  end
  if concurrent >= 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
    in_flight = in_flight + 1
  end
end
local reset = 0
if count > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  reset = tonumber(oldest[2]) + window - now
end
return {verdict, count, reset, previous, current, into, in_flight}
"""
)
# KEYS: requests, tokens, inflight. ARGV: tpm (-1: no limit), tokens used, slot id ('': none), the
# request's member in the moving window to take out ('': none; a refund).
DONE = (
    _REDIS_CLOCK
    + """
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm >= 0 and tokens > 0 then
  local previous, current = tokens_counter()
  local room = tpm - math.floor(previous * (window - into) / window + current)
  local charged = math.max(0, math.min(tokens, room))
  redis.call('HSET', KEYS[2], 'i', index, 'p', previous, 'c', current + charged)
  redis.call('PEXPIRE', KEYS[2], 2 * window)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[3], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[1], ARGV[4]) end
return 1
"""
)


# -- budgets ------------------------------------------------------------------------------------------
# KEYS: totals hash (spent, reserved), open holds (zset id -> deadline ms), held amounts (hash id ->
# nano-dollars), the legacy totals hash (micro-dollars). Amounts are integer strings: Redis adds them
# exactly (HINCRBY, 64 bits); Lua compares them as (dollars, nano-dollars) pairs, each exact in a double.
# SEED: a period's account that a release before nano-dollars opened (its micro-dollar totals) is
# carried over when this release first touches it: what it spent or held counts as spent (a hold of
# the older release is settled in the older keys, which this release does not read again).
_BUDGET = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function seed()
  if redis.call('EXISTS', KEYS[1]) == 1 then return end
  redis.call('HSET', KEYS[1], 'spent', '0', 'reserved', '0')
  local old = redis.call('HMGET', KEYS[4], 'spent', 'reserved')
  for i = 1, 2 do
    if old[i] and old[i] ~= '0' then redis.call('HINCRBY', KEYS[1], 'spent', old[i] .. '000') end
  end
end
local function sweep(now)
  local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, id in ipairs(stale) do
    local held = redis.call('HGET', KEYS[3], id)
    if held and held ~= '0' then
      redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
      redis.call('HINCRBY', KEYS[1], 'spent', held)
    end
    redis.call('HDEL', KEYS[3], id)
  end
  if #stale > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  end
end
local function totals()
  local t = redis.call('HMGET', KEYS[1], 'spent', 'reserved')
  return t[1] or '0', t[2] or '0'
end
local function split(amount)
  if #amount <= 9 then return 0, tonumber(amount) end
  return tonumber(string.sub(amount, 1, -10)), tonumber(string.sub(amount, -9))
end
local function fits(budget, ...)
  local dollars, nanos = 0, 0
  for _, amount in ipairs({...}) do
    local d, n = split(amount)
    dollars, nanos = dollars + d, nanos + n
  end
  dollars, nanos = dollars + math.floor(nanos / 1000000000), nanos % 1000000000
  local bd, bn = split(budget)
  return dollars < bd or (dollars == bd and nanos <= bn)
end
"""
# ARGV: id, amount, budget (nano-dollars), lease ms, expire-at (unix s; 0 = never).
# Returns {admitted, spent, reserved} (amounts as integer strings).
RESERVE = (
    _BUDGET
    + """
local now = now_ms()
seed()
sweep(now)
local spent, reserved = totals()
local amount = ARGV[2]
if not fits(ARGV[3], spent, reserved, amount) then
  return {0, spent, reserved}
end
if amount ~= '0' then redis.call('HINCRBY', KEYS[1], 'reserved', amount) end
redis.call('HSET', KEYS[3], ARGV[1], amount)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
if tonumber(ARGV[5]) > 0 then
  for i = 1, 3 do redis.call('EXPIREAT', KEYS[i], ARGV[5]) end
end
spent, reserved = totals()
return {1, spent, reserved}
"""
)
# ARGV: id, actual (nano-dollars). Returns 1 when the hold was open (now settled), 0 when it was
# already gone. The actual cost is at most what was held (the caller clamps it; so does this).
SETTLE = (
    _BUDGET
    + """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local actual = ARGV[2]
if not fits(held, actual) then actual = held end
if held ~= '0' then redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held) end
if actual ~= '0' then redis.call('HINCRBY', KEYS[1], 'spent', actual) end
return 1
"""
)
TOTALS = _BUDGET + "seed()\nsweep(now_ms())\nreturn {totals()}\n"
