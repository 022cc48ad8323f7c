"""Lua scripts of the L2 cache (one round trip each, atomic on the server).

Generation and epoch values start from the server clock in microseconds when
their key is missing (never created, expired, evicted by allkeys-lru, or
Redis restarted empty), so a recreated counter never repeats a value an old
query key or fill fence was built with. A counter key that holds anything
but a decimal integer (another type, garbage) is treated the same way:
deleted and restarted from the clock, so a corrupt counter can neither make
a script fail (which would lose an invalidation) nor be handed to Python.
"""

from __future__ import annotations

_NOW = """
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end
-- A counter's value (a string of digits), or nil; deletes a corrupt one.
local function counter(k)
  local v = redis.pcall('GET', k)
  if v == false then return nil end
  if type(v) == 'string' and string.len(v) <= 18 and string.match(v, '^%d+$') then
    return v
  end
  redis.call('DEL', k)
  return nil
end
"""

#: KEYS: generation and epoch keys to bump (ARGV[1] of them), then keys to
#: delete. ARGV: count, ttl ms of the counters, channel, message head (JSON
#: missing its final ``"v":[...]}``). Publishes the message with the new
#: counter values appended and returns them.
BUMP = (
    _NOW
    + """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local k = KEYS[i]
  if not counter(k) then redis.call('SET', k, now_us()) end
  redis.call('INCR', k)
  redis.call('PEXPIRE', k, ARGV[2])
  out[i] = redis.call('GET', k)
end
for i = n + 1, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. '[' .. table.concat(out, ',') .. ']}')
return out
"""
)

#: KEYS: counters to read (created from the clock when missing). ARGV: ttl ms.
READ_COUNTERS = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS do
  local v = counter(KEYS[i])
  if not v then
    v = now_us()
    redis.call('SET', KEYS[i], v, 'PX', ARGV[1])
  end
  out[i] = v
end
return out
"""
)

#: Fenced fill of an entity value. KEYS: value key, generation key, epoch
#: key. ARGV: the generation the reader saw before its snapshot, payload,
#: ttl ms, epoch ttl ms. Writes ``epoch:generation|payload`` only if no
#: invalidation of the entity happened since (the stale-fill guard); returns
#: 1 if written.
FILL_ENTITY = (
    _NOW
    + """
if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local e = counter(KEYS[3])
if not e then
  e = now_us()
  redis.call('SET', KEYS[3], e, 'PX', ARGV[4])
end
redis.call('SET', KEYS[1], e .. ':' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
"""
)
