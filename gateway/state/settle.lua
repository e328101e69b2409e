-- Settle one request, atomically: give back its lease, then charge its tokens and its cost
-- to every quota scope (with a marker, only once per response id).
-- KEYS: marker, ledger row (a hash per tenant and UTC day), then per scope (6 each): token
--       bucket, day counter, month counter, leases, money day counter, money month counter
-- ARGV: now, tokens, use marker (0|1), marker ttl, day ttl, month ttl, scope count,
--       lease id ('' for none), cost (millionths of the currency), then per scope: tpm,
--       then the ledger: write (0|1), ttl, "model|resource", and field/increment pairs
-- Returns {charged (0|1), then per scope: money spent today, this month (after)}.
local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local n = tonumber(ARGV[7])
local lease = ARGV[8]
local cost = tonumber(ARGV[9])
if lease ~= '' then
  for i = 0, n - 1 do
    redis.call('ZREM', KEYS[3 + i * 6 + 3], lease)
  end
end
local l = 10 + n
local ledger = ARGV[l] == '1'
if tokens <= 0 and cost <= 0 and not ledger then return {0} end
if ARGV[3] == '1' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then return {0} end
end
if ledger then
  local model = ARGV[l + 2]
  for j = l + 3, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[2], model .. '|' .. ARGV[j], ARGV[j + 1])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[l + 1])
end
local out = {1}
for i = 0, n - 1 do
  local k = 2 + i * 6
  local tpm = tonumber(ARGV[10 + i])
  if tpm > 0 and tokens > 0 then
    local v = redis.call('HMGET', KEYS[k + 1], 'l', 't')
    local l, t = tonumber(v[1]), tonumber(v[2])
    if l == nil then
      l, t = tpm, now
    else  -- the clock never moves back (see admit.lua)
      l, t = math.min(tpm, l + math.max(0, now - t) * tpm / 60), math.max(now, t)
    end
    l = l - tokens
    redis.call('HSET', KEYS[k + 1], 'l', tostring(l), 't', tostring(t))
    redis.call('PEXPIRE', KEYS[k + 1], math.ceil((tpm - l) * 60000 / tpm) + 1000)
  end
  local day_ttl = math.ceil(tonumber(ARGV[5])) + 3600
  local month_ttl = math.ceil(tonumber(ARGV[6])) + 3600
  redis.call('INCRBY', KEYS[k + 2], tokens)
  redis.call('EXPIRE', KEYS[k + 2], day_ttl)
  redis.call('INCRBY', KEYS[k + 3], tokens)
  redis.call('EXPIRE', KEYS[k + 3], month_ttl)
  local spent_day = redis.call('INCRBY', KEYS[k + 5], cost)
  redis.call('EXPIRE', KEYS[k + 5], day_ttl)
  local spent_month = redis.call('INCRBY', KEYS[k + 6], cost)
  redis.call('EXPIRE', KEYS[k + 6], month_ttl)
  out[#out + 1] = spent_day
  out[#out + 1] = spent_month
end
return out
