"""The Redis store's Lua scripts: each ledger operation and each task write is one script, so it is atomic.

Every script gets ``KEYS[1]`` = the key prefix and, for writes, ``ARGV[1]`` = the writer's fencing token ('' for an
unfenced writer: tools and tests that hold no lease). A token that is not the current ``<prefix>fence`` is refused
(``FENCED``): a deposed core cannot change a task or a balance. All checks come before the first write, so a
refusal (an error reply) changes nothing, as a rolled-back SQLite transaction. Times are passed in as strings and
stored as given (never rounded by Lua); integers are written with ``%d``.

Keys (``P`` = prefix):
    P acct:<user>   hash balance, frozen, created_at        P accounts   zset of user ids (score 0: sorted by id)
    P hold:<task>   hash user, amount, state, created_at, expires_at, resolved_at
    P holds         zset of every hold's task id (score: creation order)
    P holds:pending zset task id -> expires_at
    P journal       stream: id, ts, user, kind, amount, bal, frz [, task] [, note]   (P journal:id: its counter)
    P task:<id>     hash of the task record (workflow, error and images as JSON)
    P tasks         zset task id -> seq;  P tasks:active  the same, active tasks only
    P results:<user> zset task id -> seq of the user's finished tasks
    P boot, P fence counters;  P lease  the core lease (holder, PX)
    P running  1 while a core's term runs (crash accounting), as SQLite's meta 'running'
    P grant:<id>  a grant with this id was applied (an edge's request id: a re-read request is not applied twice)
Errors: ``INSUFFICIENT <available> <amount>``, ``CONFLICT <text>``, ``UNKNOWN <text>``, ``FENCED <text>``,
``INVALID <text>``, ``NEGATIVE <text>``.
"""

from __future__ import annotations

_COMMON = r"""
local P = KEYS[1]
local function fence(tok)
  if tok ~= '' then
    local cur = redis.call('GET', P .. 'fence') or '0'
    if cur ~= tok then error({err = 'FENCED token ' .. tok .. ' is stale (current ' .. cur .. ')'}) end
  end
end
local function d(n) return string.format('%d', n) end
local function journal(user, kind, task, amount, bal, frz, note, now)
  local id = redis.call('INCR', P .. 'journal:id')
  local f = {'id', id, 'ts', now, 'user', user, 'kind', kind, 'amount', d(amount), 'bal', d(bal), 'frz', d(frz)}
  if task then table.insert(f, 'task'); table.insert(f, task) end
  if note then table.insert(f, 'note'); table.insert(f, note) end
  redis.call('XADD', P .. 'journal', '*', unpack(f))
end
-- the account (balance, frozen); nil when it does not exist yet
local function get_acct(user)
  local v = redis.call('HMGET', P .. 'acct:' .. user, 'balance', 'frozen')
  if v[1] then return tonumber(v[1]), tonumber(v[2]) end
  return nil, nil
end
local function open_acct(user, initial, now)
  local bal, frz = get_acct(user)
  if bal then return bal, frz end
  redis.call('HSET', P .. 'acct:' .. user, 'balance', d(initial), 'frozen', '0', 'created_at', now)
  redis.call('ZADD', P .. 'accounts', 0, user)
  journal(user, 'open', nil, initial, initial, 0, 'initial credits', now)
  return initial, 0
end
local function write_acct(user, bal, frz, kind, task, amount, note, now)
  redis.call('HSET', P .. 'acct:' .. user, 'balance', d(bal), 'frozen', d(frz))
  journal(user, kind, task, amount, bal, frz, note, now)
end
-- resolve a pending hold (the caller checked it is pending); returns the account after
local function resolve(task, h, outcome, note, now)
  local user, amount = h[1], tonumber(h[2])
  redis.call('HSET', P .. 'hold:' .. task, 'state', outcome, 'resolved_at', now)
  redis.call('ZREM', P .. 'holds:pending', task)
  local bal, frz = open_acct(user, 0, now)
  if outcome == 'settled' then
    bal, frz = bal - amount, frz - amount
    write_acct(user, bal, frz, 'settle', task, amount, note, now)
  else
    frz = frz - amount
    write_acct(user, bal, frz, 'release', task, amount, note, now)
  end
  return bal, frz
end
local function get_hold(task)  -- {user, amount, state, expires_at} or nil
  local h = redis.call('HMGET', P .. 'hold:' .. task, 'user', 'amount', 'state', 'expires_at')
  if h[1] then return h end
  return nil
end
"""

# ARGV: token, user, initial, now -> {balance, frozen}
ACCOUNT = (
    _COMMON
    + r"""
fence(ARGV[1])
local bal, frz = open_acct(ARGV[2], tonumber(ARGV[3]), ARGV[4])
return {bal, frz}
"""
)

# ARGV: token, user, amount, initial, note ('' = none), has_note, now, allow_negative, max -> {balance, frozen}
GRANT = (
    _COMMON
    + r"""
fence(ARGV[1])
local user, amount, initial, max = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[9])
local once = nil
if ARGV[10] ~= '' then once = P .. 'grant:' .. ARGV[10] end
local bal, frz = get_acct(user)
if once and redis.call('EXISTS', once) == 1 then return {bal or initial, frz or 0} end  -- applied already
if not bal then bal, frz = initial, 0 end
if math.abs(bal + amount) > max then error({err = 'INVALID the balance of ' .. user .. ' would leave +-2^53'}) end
if bal - frz + amount < 0 and ARGV[8] ~= '1' then
  error({err = 'NEGATIVE the grant would leave ' .. user .. ' with ' .. d(bal - frz + amount) ..
         ' credits available; send "allowNegative": true to allow it'})
end
bal, frz = open_acct(user, initial, ARGV[7])
local note = nil
if ARGV[6] == '1' then note = ARGV[5] end
bal = bal + amount
write_acct(user, bal, frz, 'grant', nil, amount, note, ARGV[7])
if once then redis.call('SET', once, '1', 'EX', 7 * 86400) end
return {bal, frz}
"""
)

# crash accounting (see SqliteStore.begin_run/end_run/mark_dispatched/count_crash). ARGV: token
END_RUN = (
    _COMMON
    + r"""
fence(ARGV[1])
redis.call('SET', P .. 'running', '0')
return 1
"""
)

# ARGV: token, task_id, boot
MARK_DISPATCHED = (
    _COMMON
    + r"""
fence(ARGV[1])
if redis.call('EXISTS', P .. 'task:' .. ARGV[2]) == 1 then
  redis.call('HSET', P .. 'task:' .. ARGV[2], 'dispatched_boot', ARGV[3])
end
return 1
"""
)

# ARGV: token, limit, crashed_boot -> ids of active tasks with crashes >= limit, by seq
COUNT_CRASH = (
    _COMMON
    + r"""
fence(ARGV[1])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'tasks:active', 0, -1)) do
  local key = P .. 'task:' .. id
  local t = redis.call('HMGET', key, 'state', 'dispatched_boot')
  if t[1] ~= 'queued' or t[2] == ARGV[3] then redis.call('HINCRBY', key, 'crashes', 1) end
  if tonumber(redis.call('HGET', key, 'crashes') or '0') >= tonumber(ARGV[2]) then table.insert(out, id) end
end
return out
"""
)

# ARGV: token, user, task, amount, initial, now, expires_at -> {balance, frozen, changed}
FREEZE = (
    _COMMON
    + r"""
fence(ARGV[1])
local user, task, amount, initial, now = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local bal, frz = get_acct(user)
if not bal then bal, frz = initial, 0 end
local h = get_hold(task)
if h then
  if h[1] == user and tonumber(h[2]) == amount then
    bal, frz = open_acct(user, initial, now)
    return {bal, frz, 0}
  end
  error({err = 'CONFLICT task ' .. task .. ' already holds ' .. h[2] .. ' for ' .. h[1]})
end
if bal - frz < amount then error({err = 'INSUFFICIENT ' .. d(bal - frz) .. ' ' .. d(amount)}) end
bal, frz = open_acct(user, initial, now)
local n = redis.call('INCR', P .. 'holds:n')
redis.call('HSET', P .. 'hold:' .. task, 'user', user, 'amount', d(amount), 'state', 'pending',
           'created_at', now, 'expires_at', ARGV[7])
redis.call('ZADD', P .. 'holds', n, task)
redis.call('ZADD', P .. 'holds:pending', ARGV[7], task)
frz = frz + amount
write_acct(user, bal, frz, 'freeze', task, amount, nil, now)
return {bal, frz, 1}
"""
)

# ARGV: token, task, outcome, amount ('' = any), note, has_note, now -> {user, balance, frozen, changed}
RESOLVE = (
    _COMMON
    + r"""
fence(ARGV[1])
local task, outcome, now = ARGV[2], ARGV[3], ARGV[7]
local h = get_hold(task)
if not h then error({err = 'UNKNOWN no hold for task ' .. task}) end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= tonumber(h[2]) then
  error({err = 'CONFLICT task ' .. task .. ' holds ' .. h[2] .. ', not ' .. ARGV[4]})
end
if h[3] == outcome then
  local bal, frz = open_acct(h[1], 0, now)
  return {h[1], bal, frz, 0}
end
if h[3] ~= 'pending' then error({err = 'CONFLICT task ' .. task .. ' is already ' .. h[3]}) end
local note = nil
if ARGV[6] == '1' then note = ARGV[5] end
local bal, frz = resolve(task, h, outcome, note, now)
return {h[1], bal, frz, 1}
"""
)

# ARGV: token, now ('' = start-up: every pending hold), new_expires_at, why, ts (the journal's time) -> list of
# {task, user, amount, state, expires_at, outcome, balance, frozen, task_state ('' = none)}
SWEEP = (
    _COMMON
    + r"""
fence(ARGV[1])
local now, new_exp, why = ARGV[2], ARGV[3], ARGV[4]
local ids
if now == '' then
  ids = redis.call('ZRANGE', P .. 'holds:pending', 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', P .. 'holds:pending', '-inf', now)
end
-- SQLite's order: by deadline then creation (at start-up: by creation)
local order = {}
for _, task in ipairs(ids) do
  order[task] = {tonumber(redis.call('ZSCORE', P .. 'holds:pending', task)),
                 tonumber(redis.call('ZSCORE', P .. 'holds', task))}
end
table.sort(ids, function(a, b)
  local x, y = order[a], order[b]
  if now ~= '' and x[1] ~= y[1] then return x[1] < y[1] end
  return x[2] < y[2]
end)
local ts = ARGV[5]
local out = {}
for _, task in ipairs(ids) do
  local h = get_hold(task)
  local st = redis.call('HGET', P .. 'task:' .. task, 'state')
  local active = st == 'queued' or st == 'submitted' or st == 'running'
  if active and now ~= '' then
    redis.call('HSET', P .. 'hold:' .. task, 'expires_at', new_exp)
    redis.call('ZADD', P .. 'holds:pending', new_exp, task)
    local bal, frz = open_acct(h[1], 0, ts)
    table.insert(out, {task, h[1], h[2], h[3], h[4], 'extended', bal, frz, st})
  elseif not active then
    local outcome = 'released'
    if st == 'succeeded' then outcome = 'settled' end
    local bal, frz = resolve(task, h, outcome, why .. '; task ' .. (st or 'never saved'), ts)
    table.insert(out, {task, h[1], h[2], h[3], h[4], outcome, bal, frz, st or ''})
  end
end
return out
"""
)

# ARGV: token, task_id, seq, user, state, then field/value pairs (a field '-name' deletes name: a None)
SAVE_TASK = (
    _COMMON
    + r"""
fence(ARGV[1])
local id, seq, user, state = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = P .. 'task:' .. id
local fields = {}
local exists = redis.call('EXISTS', key) == 1
for i = 6, #ARGV, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  local mutable = f == 'state' or f == 'reason' or f == 'prompt_id' or f == 'backend' or f == 'error'
                  or f == 'updated_at' or f == 'crashes'
  if f == 'images' then
    -- images are appended, never replaced (as INSERT OR IGNORE by index)
    local old = redis.call('HGET', key, 'images')
    if (not old) or #cjson.decode(v) > #cjson.decode(old) then table.insert(fields, f); table.insert(fields, v) end
  elseif f:sub(1, 1) == '-' then
    if exists then redis.call('HDEL', key, f:sub(2)) end
  elseif mutable or not exists then
    table.insert(fields, f); table.insert(fields, v)
  end
end
if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
redis.call('ZADD', P .. 'tasks', seq, id)
if state == 'queued' or state == 'submitted' or state == 'running' then
  redis.call('ZADD', P .. 'tasks:active', seq, id)
else
  redis.call('ZREM', P .. 'tasks:active', id)
  redis.call('ZADD', P .. 'results:' .. user, seq, id)
end
return 1
"""
)

# ARGV: zset suffix, min, max, limit (-1: all), reverse ('1') -> list of flat HGETALL arrays
TASKS = r"""
local P = KEYS[1]
local ids
if ARGV[5] == '1' then
  ids = redis.call('ZREVRANGEBYSCORE', P .. ARGV[1], ARGV[3], ARGV[2], 'LIMIT', 0, ARGV[4])
else
  ids = redis.call('ZRANGEBYSCORE', P .. ARGV[1], ARGV[2], ARGV[3], 'LIMIT', 0, ARGV[4])
end
local out = {}
for _, id in ipairs(ids) do table.insert(out, redis.call('HGETALL', P .. 'task:' .. id)) end
return out
"""

# -> {accounts (flat: user, balance, frozen, ...), holds (flat: task, user, amount, state, expires_at, ...)}
SNAPSHOT = r"""
local P = KEYS[1]
local accts, holds = {}, {}
for _, u in ipairs(redis.call('ZRANGE', P .. 'accounts', 0, -1)) do
  local v = redis.call('HMGET', P .. 'acct:' .. u, 'balance', 'frozen')
  table.insert(accts, {u, v[1], v[2]})
end
for _, t in ipairs(redis.call('ZRANGE', P .. 'holds', 0, -1)) do
  local h = redis.call('HMGET', P .. 'hold:' .. t, 'user', 'amount', 'state', 'expires_at')
  table.insert(holds, {t, h[1], h[2], h[3], h[4]})
end
return {accts, holds}
"""

# the core lease. ARGV: holder, ttl_ms -> the new fencing token, or 0 when another holder has it
ACQUIRE = r"""
local P = KEYS[1]
if redis.call('SET', P .. 'lease', ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', P .. 'fence')
end
return 0
"""

# ARGV: holder, token, ttl_ms -> 1 when still ours (renewed), 0 when lost
RENEW = r"""
local P = KEYS[1]
if redis.call('GET', P .. 'lease') == ARGV[1] and redis.call('GET', P .. 'fence') == ARGV[2] then
  redis.call('PEXPIRE', P .. 'lease', ARGV[3])
  return 1
end
return 0
"""

# ARGV: holder -> 1 when released
RELEASE = r"""
local P = KEYS[1]
if redis.call('GET', P .. 'lease') == ARGV[1] then return redis.call('DEL', P .. 'lease') end
return 0
"""
