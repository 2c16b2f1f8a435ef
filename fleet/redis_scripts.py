"""The Lua scripts that keep fleet budget accounts in Redis exact: every change to an account is one atomic script.

An account is one hash per (rule, split key, window start), with a sorted set beside it of the
holders whose leases are live (score: when each lease expires, in Redis's own clock, ms). All
amounts are integers: micro-dollars, tokens, requests (dimensions u, t, r).

Hash fields:
  s<d>            settled spend of the fleet
  l<d>            allowance leased out, summed over live holders
  l<d>:<holder>   one holder's lease
  c<d>:<holder>   one holder's cumulative settled spend (what makes settlement idempotent)
  f:<threshold>   set once, by the first holder to claim a threshold's alert (HSETNX)

A holder reports its cumulative spend and the lease it keeps, never deltas: a sync retried after a
timeout counts nothing twice, and a holder that finds the account gone (Redis restarted without
persistence) puts its whole window's spend back.
"""
from __future__ import annotations

DIMS = ("u", "t", "r")
NO_LIMIT = -1

# KEYS: account hash, holders zset
# ARGV: holder, ttl_ms, expire_at (unix s; 0: never), want (1: lease more), k (slice divisor),
#       then per dimension u, t, r: cumulative spend, lease kept, need (the least grant worth having), limit (-1: none)
# returns: {granted u t r, spent u t r, leased u t r, mine u t r, refused dimension (0: none, 1-3)}
SYNC = r"""
local h, z = KEYS[1], KEYS[2]
local holder = ARGV[1]
local ttl = tonumber(ARGV[2])
local expire_at = tonumber(ARGV[3])
local want = ARGV[4] == '1'
local k = tonumber(ARGV[5])
local dims = {'u', 't', 'r'}
-- integers as text: Lua's tostring writes 1e+15 for large numbers, which HINCRBY refuses
local function n(v) return string.format('%d', v) end
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)

-- leases of holders that stopped renewing them (a killed sidecar) go back to the account
local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
for _, d in ipairs(dead) do
  for _, x in ipairs(dims) do
    local v = tonumber(redis.call('HGET', h, 'l' .. x .. ':' .. d) or '0')
    if v ~= 0 then redis.call('HINCRBY', h, 'l' .. x, n(-v)) end
    redis.call('HDEL', h, 'l' .. x .. ':' .. d)
  end
  redis.call('ZREM', z, d)
end

local spent, leased, mine, need, limit = {}, {}, {}, {}, {}
for i, x in ipairs(dims) do
  local base = 5 + (i - 1) * 4
  local cum = tonumber(ARGV[base + 1])
  local keep = math.max(0, tonumber(ARGV[base + 2]))
  need[i] = tonumber(ARGV[base + 3])
  limit[i] = tonumber(ARGV[base + 4])
  local before = tonumber(redis.call('HGET', h, 'c' .. x .. ':' .. holder) or '0')
  if cum > before then
    redis.call('HINCRBY', h, 's' .. x, n(cum - before))
    redis.call('HSET', h, 'c' .. x .. ':' .. holder, n(cum))
  end
  local m = tonumber(redis.call('HGET', h, 'l' .. x .. ':' .. holder) or '0')
  if keep < m then
    redis.call('HINCRBY', h, 'l' .. x, n(keep - m))
    redis.call('HSET', h, 'l' .. x .. ':' .. holder, n(keep))
    m = keep
  end
  mine[i] = m
  spent[i] = tonumber(redis.call('HGET', h, 's' .. x) or '0')
  leased[i] = tonumber(redis.call('HGET', h, 'l' .. x) or '0')
end

local granted = {0, 0, 0}
local refused = 0
if want then
  local holders = redis.call('ZCARD', z)
  if not redis.call('ZSCORE', z, holder) then holders = holders + 1 end
  local avail = {}
  for i = 1, 3 do
    if limit[i] >= 0 then
      avail[i] = limit[i] - spent[i] - leased[i]
      if need[i] > 0 and avail[i] < need[i] and refused == 0 then refused = i end
    end
  end
  if refused == 0 then
    for i, x in ipairs(dims) do
      if limit[i] >= 0 and avail[i] > 0 then
        -- slices shrink as the limit nears: a share of what is left, never less than the call needs
        local g = math.min(avail[i], math.max(need[i], math.floor(avail[i] / (k * holders))))
        if g > 0 then
          redis.call('HINCRBY', h, 'l' .. x .. ':' .. holder, n(g))
          redis.call('HINCRBY', h, 'l' .. x, n(g))
          granted[i] = g
          mine[i] = mine[i] + g
          leased[i] = leased[i] + g
        end
      end
    end
  end
end

if mine[1] > 0 or mine[2] > 0 or mine[3] > 0 then
  redis.call('ZADD', z, n(now + ttl), holder)
else
  redis.call('ZREM', z, holder)
  for _, x in ipairs(dims) do redis.call('HDEL', h, 'l' .. x .. ':' .. holder) end
end
if expire_at > 0 then
  redis.call('EXPIREAT', h, expire_at)
  redis.call('EXPIREAT', z, expire_at)
end
return {granted[1], granted[2], granted[3], spent[1], spent[2], spent[3],
        leased[1], leased[2], leased[3], mine[1], mine[2], mine[3], refused}
"""

# KEYS: account hash; ARGV: threshold text, expire_at (0: never). Returns 1 to the one holder that fires it.
CLAIM_ALERT = r"""
local won = redis.call('HSETNX', KEYS[1], 'f:' .. ARGV[1], '1')
if tonumber(ARGV[2]) > 0 then redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[2])) end
return won
"""
