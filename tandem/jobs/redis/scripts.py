"""The Lua scripts of the Redis store. Each state change of a job is one script, so it is
atomic, and those that finish a job act only on an unfinished one, so that a job delivered
twice is answered once. Each names its KEYS and ARGV, in the order the store passes them."""

# The scripts that move an accepted job on (a lease, its end, a cancel, its webhook's state,
# its fast answer), a worker's heartbeat and the counters run with this line, so that Redis
# at its memory limit still takes them: there it refuses a plain script's first write that
# may add data, and with it every lease, so that a queue of small images that had filled
# Redis never drained. A finished job gives its image back. ENQUEUE runs without it: at the
# limit, new jobs are refused. Redis 7 reads the flag; Redis 6 cannot compile the line, and
# the store then runs the scripts without it.
ALLOW_OOM = "#!lua flags=allow-oom\n"

# KEYS: job, queue, idempotency key, owners. ARGV: id, now, meta, image, max length, job key
# prefix, whether there is an idempotency key, owner ('' for none), owner's share.
# Returns {id, 1} for a job it stored, {id, 0} for the earlier job that stands for this
# request, 'queue' when the queue is full, or 'owner' when the owner's share of it is.
# The idempotency key stands for its job as long as the job is kept: it has no expiry until
# the job finishes, and then the job's (see FINISH_BODY). It had expired a result TTL after
# the first request, and a retry after a longer backlog queued the image again.
ENQUEUE = """
if ARGV[7] == '1' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier and redis.call('EXISTS', ARGV[6] .. earlier) == 1 then return {earlier, 0} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {ARGV[1], 0} end
local owner, share = ARGV[8], tonumber(ARGV[9])
if owner ~= '' and share > 0 and tonumber(redis.call('HGET', KEYS[4], owner) or 0) >= share then
  return 'owner'
end
local limit = tonumber(ARGV[5])
if limit > 0 and redis.call('XLEN', KEYS[2]) >= limit then return 'queue' end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'queued', 'created_at', ARGV[2], 'updated_at', ARGV[2],
           'attempts', 0, 'meta', ARGV[3], 'image', ARGV[4], 'entry', entry)
if owner ~= '' then
  redis.call('HSET', KEYS[1], 'owner', owner)
  redis.call('HINCRBY', KEYS[4], owner, 1)
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'idempotency', KEYS[3])
end
return {ARGV[1], 1}
"""

# The scripts that change a job (FINISH, LEASE, FAIL, CANCEL) end their ARGV with the changes
# channel and the job's id, and publish the id there first thing: from the script, the
# announcement reaches the server that made the change. Published on a connection of its own,
# it could go to an old primary after a failover, whose subscribers are not the new one's.
# Nothing reads the message before the script has finished.
ANNOUNCE = """
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
"""

# Finish an unfinished job and count it; one with a callback URL joins the deliveries set, and
# one with an owner leaves the owner's count (a count at 0 goes).
# KEYS: job, queue, counters, deliveries, owners.
# ARGV: status, now, ttl_ms, result, error, group, tally (counter names, comma-separated),
# then the two of ANNOUNCE.
FINISH_BODY = """
-- A job's metadata as a table; empty if it is not JSON (a damaged record still finishes).
local function decoded_meta(job)
  local ok, meta = pcall(cjson.decode, redis.call('HGET', job, 'meta') or '')
  if ok and type(meta) == 'table' then return meta end
  return {}
end
local function finish(job, queue, status, now, ttl_ms, result, err, group, counters, tally,
                      deliveries, owners)
  local current = redis.call('HGET', job, 'status')
  if current ~= 'queued' and current ~= 'running' then return 0 end
  local owner = redis.call('HGET', job, 'owner')
  if owner and redis.call('HINCRBY', owners, owner, -1) <= 0 then
    redis.call('HDEL', owners, owner)
  end
  local entry = redis.call('HGET', job, 'entry')
  -- A run that ends after a cancel request keeps its result or error, but the job says
  -- cancelled.
  if redis.call('HGET', job, 'cancel') == '1' then status = 'cancelled' end
  redis.call('HSET', job, 'status', status, 'updated_at', now, 'finished_at', now)
  if result ~= '' then redis.call('HSET', job, 'result', result) end
  if err ~= '' then redis.call('HSET', job, 'error', err) else redis.call('HDEL', job, 'error') end
  redis.call('HDEL', job, 'image')
  redis.call('PEXPIRE', job, ttl_ms)
  local idempotency = redis.call('HGET', job, 'idempotency')
  if idempotency then redis.call('PEXPIRE', idempotency, ttl_ms) end
  if entry then
    redis.call('XACK', queue, group, entry)
    redis.call('XDEL', queue, entry)
  end
  redis.call('HINCRBY', counters, 'jobs_' .. status, 1)
  for name in string.gmatch(tally, '[^,]+') do redis.call('HINCRBY', counters, name, 1) end
  if type(decoded_meta(job)['callback_url']) == 'string' then
    redis.call('ZADD', deliveries, now, job)
  end
  return 1
end
"""
# Returns 0 if the job was already final; 1 if stored; 2 if stored with a result and no tally
# while the job has its fast answer (it arrived after the worker read the job: see Completed).
FINISH = (
    FINISH_BODY
    + ANNOUNCE
    + """
local stored = finish(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                      KEYS[3], ARGV[7], KEYS[4], KEYS[5])
if stored == 1 and ARGV[4] ~= '' and ARGV[7] == '' then
  if type(decoded_meta(KEYS[1])['fast']) == 'table' then return 2 end
end
return stored
"""
)

# Lease a delivered entry. KEYS: job, queue, counters, deliveries, owners.
# ARGV: entry, now, max_attempts, ttl_ms, lost, group, missing (the error for a job without
# its image), then the two of ANNOUNCE.
# Returns the image, or false when the entry is stale (job gone, finished, cancelled, out of
# attempts, or without its image).
LEASE = (
    FINISH_BODY
    + ANNOUNCE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
local current = redis.call('HGET', KEYS[1], 'entry')
if (status ~= 'queued' and status ~= 'running') or current ~= ARGV[1] then
  redis.call('XACK', KEYS[2], ARGV[6], ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
  return false
end
-- Its worker stopped after the client cancelled it: not run again.
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  finish(KEYS[1], KEYS[2], 'cancelled', ARGV[2], ARGV[4], '', '', ARGV[6], KEYS[3], '', KEYS[4],
         KEYS[5])
  return false
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
if attempts >= tonumber(ARGV[3]) then
  local reason = string.format(ARGV[5], attempts)
  finish(KEYS[1], KEYS[2], 'failed', ARGV[2], ARGV[4], '', reason, ARGV[6], KEYS[3], '', KEYS[4],
         KEYS[5])
  return false
end
local image = redis.call('HGET', KEYS[1], 'image')
if not image then
  finish(KEYS[1], KEYS[2], 'failed', ARGV[2], ARGV[4], '', ARGV[7], ARGV[6], KEYS[3], '', KEYS[4],
         KEYS[5])
  return false
end
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[2], 'attempts', attempts + 1)
return image
"""
)

# Renew a worker's leases: reset the idle time of each running job's entry it still holds.
# KEYS: queue, then the jobs. ARGV: group, worker. Returns the positions (from 1) of the jobs
# renewed.
EXTEND = """
local renewed = {}
for i = 2, #KEYS do
  local entry = redis.call('HGET', KEYS[i], 'entry')
  if entry and redis.call('HGET', KEYS[i], 'status') == 'running' then
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1, ARGV[2])
    if #held == 1 then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
      renewed[#renewed + 1] = i - 1
    end
  end
end
return renewed
"""

# A worker's run failed. KEYS: job, queue, counters, deliveries, owners.
# ARGV: now, error, group, id, retry (1 or 0), max_attempts, ttl_ms, then the two of ANNOUNCE.
# A running job with attempts left, whose cancel nobody asked for, goes back under a new entry
# (returns 1); with retry, a job that is not running is not this worker's and is left alone.
# Any other job finishes.
FAIL = (
    FINISH_BODY
    + ANNOUNCE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
local cancelled = redis.call('HGET', KEYS[1], 'cancel') == '1'
if ARGV[5] == '1' and attempts < tonumber(ARGV[6]) and not cancelled then
  if status ~= 'running' then return 0 end
  local old = redis.call('HGET', KEYS[1], 'entry')
  local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[4])
  redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[1], 'error', ARGV[2],
             'entry', entry)
  if old then
    redis.call('XACK', KEYS[2], ARGV[3], old)
    redis.call('XDEL', KEYS[2], old)
  end
  redis.call('HINCRBY', KEYS[3], 'jobs_retried', 1)
  return 1
end
finish(KEYS[1], KEYS[2], 'failed', ARGV[1], ARGV[7], '', ARGV[2], ARGV[3], KEYS[3], '', KEYS[4],
       KEYS[5])
return 0
"""
)

# Cancel: a queued job at once, a running one when it finishes. KEYS: job, queue, counters,
# deliveries, owners.
# ARGV: now, ttl ms, group, then the two of ANNOUNCE.
CANCEL = (
    FINISH_BODY
    + ANNOUNCE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  return finish(KEYS[1], KEYS[2], 'cancelled', ARGV[1], ARGV[2], '', '', ARGV[3], KEYS[3], '',
                KEYS[4], KEYS[5])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'updated_at', ARGV[1])
end
return 0
"""
)

# Set a job's webhook state, unless the job has expired; a final one leaves the deliveries
# set. KEYS: job, deliveries. ARGV: the state as JSON, whether it is final (1 or 0).
RECORD_DELIVERY = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'webhook', ARGV[1]) end
if ARGV[2] == '1' then redis.call('ZREM', KEYS[2], KEYS[1]) end
return 0
"""

# A worker's heartbeat, run at Redis's memory limit as well: refused there, it had left
# /health/all saying that no worker served the model while the workers drained the queue.
# KEYS: workers, models. ARGV: worker, now, model.
BEAT = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
"""

# Add to counters; they are a fixed few, so at the memory limit they grow nothing worth
# refusing. KEYS: counters. ARGV: name, amount, name, amount...
ADD_COUNTS = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
"""

# Delete a consumer of the group if it holds no entry: the entries of one that holds some
# await XAUTOCLAIM, and deleting it would drop them from the group. KEYS: queue.
# ARGV: group, consumer. Returns 1 if deleted.
FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Replace a job's metadata if it is still what was read; returns the result stored before,
# if any. KEYS: job. ARGV: read, new.
ATTACH = """
if redis.call('HGET', KEYS[1], 'meta') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'meta', ARGV[2])
  return redis.call('HGET', KEYS[1], 'result')
end
return false
"""
