-- Admit one request against every quota scope, atomically.
-- KEYS, per scope (7 each): request bucket, token bucket, day counter, month counter,
--       leases, money day counter, money month counter; then the admission marker
-- ARGV: now, lease id, lease ttl, day ttl, month ttl, scope count, marker ttl (ms),
--       then per scope: rpm, tpm, tokens/day, tokens/month, max concurrent,
--       budget/day, budget/month (millionths of the currency)
-- Returns {allowed, reason, retry_after, limit_req, remaining_req, reset_req,
--          limit_tok, remaining_tok, reset_tok, scope index}; floats as strings.
local now = tonumber(ARGV[1])
local lease = ARGV[2]
local lease_ttl = tonumber(ARGV[3])
local day_ttl = tonumber(ARGV[4])
local month_ttl = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local marker = KEYS[n * 7 + 1]

-- The same admission again (its first answer was read too late): the same answer,
-- nothing counted twice.
local seen = redis.call('GET', marker)
if seen then return cjson.decode(seen) end

-- A bucket's level refilled up to now, and its clock: never moved back, so a call that
-- carries an older time (its first try answered too late) cannot refill twice.
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, t = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap, now end
  return math.min(cap, l + math.max(0, now - t) * cap / 60), math.max(now, t)
end

local function save(key, l, cap, t)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(t))
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end

local first = nil
local levels = {}
for i = 0, n - 1 do
  local k, a = i * 7, 7 + i * 7
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tpd, tpmo, conc = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local cpd, cpmo = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local rq, rq_t = 0, now
  local tk = 0
  if rpm > 0 then rq, rq_t = level(KEYS[k + 1], rpm) end
  if tpm > 0 then tk = level(KEYS[k + 2], tpm) end
  levels[i] = {rq, tk, rq_t}
  local reason, retry = 0, 0
  if rpm > 0 and rq < 1 then
    reason, retry = 1, (1 - rq) * 60 / rpm
  elseif tpm > 0 and tk <= 0 then
    reason, retry = 2, (1 - tk) * 60 / tpm
  elseif tpd > 0 and tonumber(redis.call('GET', KEYS[k + 3]) or '0') >= tpd then
    reason, retry = 3, day_ttl
  elseif tpmo > 0 and tonumber(redis.call('GET', KEYS[k + 4]) or '0') >= tpmo then
    reason, retry = 4, month_ttl
  elseif cpd > 0 and tonumber(redis.call('GET', KEYS[k + 6]) or '0') >= cpd then
    reason, retry = 6, day_ttl
  elseif cpmo > 0 and tonumber(redis.call('GET', KEYS[k + 7]) or '0') >= cpmo then
    reason, retry = 7, month_ttl
  elseif conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 5]) >= conc then reason, retry = 5, 1 end
  end
  local taken = 0
  if reason == 0 then taken = 1 end
  local reset_req, reset_tok = 0, 0
  if rpm > 0 then reset_req = (rpm - (rq - taken)) * 60 / rpm end
  if tpm > 0 then reset_tok = math.max(0, (tpm - tk) * 60 / tpm) end
  local out = {1 - math.min(reason, 1), reason, tostring(retry), rpm, math.floor(rq) - taken,
               tostring(reset_req), tpm, math.floor(tk), tostring(reset_tok), i}
  if reason > 0 then return out end
  if first == nil then first = out end
end

for i = 0, n - 1 do
  local k, a = i * 7, 7 + i * 7
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 5])
  if rpm > 0 then save(KEYS[k + 1], levels[i][1] - 1, rpm, levels[i][3]) end
  if conc > 0 then
    redis.call('ZADD', KEYS[k + 5], now + lease_ttl, lease)
    redis.call('PEXPIRE', KEYS[k + 5], math.ceil(lease_ttl * 2000))
  end
end
if first ~= nil then redis.call('SET', marker, cjson.encode(first), 'PX', ARGV[7]) end
return first
