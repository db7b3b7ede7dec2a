//! Lua scripts, so that "check the owner, then claim" happens atomically in Redis.

use std::sync::LazyLock;

use redis::Script;

/// Claims pending entries for redelivery to a consumer, each only if it is still owned by
/// the expected consumer (this one, or a crashed one being taken over), counting a delivery.
/// When the claimer takes another's entries, its own lease must still be its (checked in the
/// same step, on the server's clock): a claimer whose lease ran out was cut off itself, and
/// gets the error `CUTOFF` instead. KEYS: stream, claimer's lease. ARGV: group, claimer,
/// expected owner, least idle ms (0: any), claimer's lease token, ids...
/// Entries touched since (idle less than that) are left out too. Returns, per id claimed,
/// `{entry, delivery_count}`; `{id, -1}` when the entry was trimmed from the stream (the
/// claim then drops it from the pending list); `{id, -2}` when it is in no one's pending list
/// (acknowledged, or its group was destroyed and re-created). Entries another consumer owns
/// now are left out.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[3] ~= ARGV[2] and redis.call('GET', KEYS[2]) ~= ARGV[5] then
  return redis.error_reply('CUTOFF the claimer lease ran out')
end
local out = {}
local min_idle = tonumber(ARGV[4])
for i = 6, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[3] and p[1][3] >= min_idle then
    local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])
    if e[1] then
      table.insert(out, {e[1], p[1][4] + 1})
    else
      table.insert(out, {ARGV[i], -1})
    end
  elseif not p[1] then
    table.insert(out, {ARGV[i], -2})
  end
end
return out
",
    )
});

/// Resets the idle time of entries this consumer still owns and that still exist (the
/// heartbeat of long handlers and of nacked entries waiting for their retry), without counting
/// a delivery. A trimmed entry is left alone: claiming it would drop it from the pending list
/// unreported. KEYS: stream. ARGV: group, consumer, ids... Returns how many were touched.
pub(crate) static TOUCH_OWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] and #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
",
    )
});

/// Takes or keeps a lease: extends it when this token holds it, takes it (and registers the
/// consumer as a lease user) when it is free. Safe to retry. While the stream does not exist
/// (deleted under a running consumer) a free lease is not taken, so that nothing is left
/// beside a deleted stream; the consumer counts as holding it, and takes it when its group is
/// re-created. KEYS: lease, registry, stream. ARGV: token, ttl ms, consumer. Returns 1 when
/// held (extended), 2 when it was free and is taken now, 0 when another token holds it.
pub(crate) static HOLD_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return 1
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  return 2
end
return 0
",
    )
});

/// Acknowledges entries only while the consumer's lease holds this token (the ack of a
/// partition's owner: one that lost the partition cannot ack into it). KEYS: stream, lease.
/// ARGV: token, group, ids... Returns how many were acknowledged, or -1 when the lease is
/// another's (nothing acknowledged).
pub(crate) static FENCED_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return -1
end
return redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, 3))
",
    )
});

/// Stores a topic's partition count unless it has one. A topic that is a stream of its own
/// (with entries or groups that its partitions would hide) is refused. KEYS: the topic's
/// settings hash, the topic. ARGV: partitions, created_at. Returns the count stored now, or
/// -1 when the topic is a stream.
pub(crate) static CREATE_PARTITIONS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], 'partitions') == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
if redis.call('HSETNX', KEYS[1], 'partitions', ARGV[1]) == 1 then
  redis.call('HSETNX', KEYS[1], 'created_at', ARGV[2])
end
return tonumber(redis.call('HGET', KEYS[1], 'partitions'))
",
    )
});

/// A group member's heartbeat, on the server's clock: forgets members whose time ran out,
/// refuses a member name live under another token, records this member as live for the TTL.
/// KEYS: the group's members (sorted set of name by expiry ms), their tokens (hash).
/// ARGV: member, token, ttl ms. Returns the live members, or the error `TAKEN`.
pub(crate) static MEMBER_HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, name in ipairs(gone) do
  redis.call('HDEL', KEYS[2], name)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= ARGV[2] then
  return redis.error_reply('TAKEN member name held by another process')
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- Kept as long as the longest-lived record needs (members may use different TTLs).
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < ttl * 2 then
    redis.call('PEXPIRE', KEYS[i], ttl * 2)
  end
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
",
    )
});

/// Removes a group member if it still holds this token. KEYS: members, tokens.
/// ARGV: member, token. Returns 1 when removed.
pub(crate) static MEMBER_LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
",
    )
});

/// The holder of a lease and its remaining time. KEYS: lease. Returns `{holder, pttl ms}`, or
/// `{"", -2}` when the lease is free.
pub(crate) static LEASE_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  return {'', -2}
end
return {holder, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Drops a lease if we hold it. KEYS: lease, registry. ARGV: token, consumer.
pub(crate) static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Finds crashed consumers: registered (they use leases), lease gone, entries pending.
/// Forgets registered consumers whose lease is gone and that hold nothing.
/// Only while the caller's own lease is still its (else the error `CUTOFF`: the caller was cut
/// off too, and the others may merely not have renewed yet).
/// KEYS: stream, registry, caller's lease. ARGV: group, this consumer, lease key prefix,
/// caller's lease token. Returns `{name, pending}` per crashed consumer.
pub(crate) static CRASHED_CONSUMERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return redis.error_reply('CUTOFF the caller lease ran out')
end
local crashed = {}
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return crashed end
for _, c in ipairs(consumers) do
  local name, pending
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name and name ~= ARGV[2] and redis.call('SISMEMBER', KEYS[2], name) == 1
     and redis.call('EXISTS', ARGV[3] .. name) == 0 then
    if pending > 0 then
      table.insert(crashed, {name, pending})
    else
      redis.call('SREM', KEYS[2], name)
    end
  end
end
return crashed
",
    )
});

/// Creates an empty stream with its settings hash, unless the stream exists. The temporary
/// group that makes `MKSTREAM` work is gone before anyone can see it.
/// KEYS: stream, meta. ARGV: created_at, retention_ms or '', max_length or ''.
pub(crate) static CREATE_STREAM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XGROUP', 'CREATE', KEYS[1], '~streamwise-create', '$', 'MKSTREAM')
redis.call('XGROUP', 'DESTROY', KEYS[1], '~streamwise-create')
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'created_at', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'retention_ms', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'max_length', ARGV[3]) end
return 1
",
    )
});

/// Saves a checkpoint, only while its stream exists: a subscription that ends after its
/// stream was deleted does not leave a checkpoint hash of a stream that is gone behind.
/// KEYS: stream, checkpoint hash. ARGV: field, value. Returns 1 when saved.
pub(crate) static SAVE_CHECKPOINT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Dead-letters an entry in one step: appends its record to the dead-letter stream, then
/// acknowledges the entry in its group. A failing `XADD` stops the script before the `XACK`
/// (unlike `MULTI`, where a command failing at `EXEC` lets the next run), so an entry never
/// leaves the pending list without its record. KEYS: stream, dead-letter stream. ARGV:
/// group, entry id, the record's fields and values. Returns `{record id, acked (0 or 1)}`.
pub(crate) static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local added = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return {added, acked}
",
    )
});

/// [`DEAD_LETTER`] unless another holder has the consumer's lease (as [`FENCED_ACK`]).
/// KEYS: stream, dead-letter stream, lease. ARGV: token, group, entry id, the record's fields
/// and values. Returns `{record id, acked}`, or -1 when the lease is another's (nothing
/// written).
pub(crate) static FENCED_DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then
  return -1
end
local added = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
local acked = redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
return {added, acked}
",
    )
});

/// Moves a key to its new name (the key-name migration of release 0.2): a rename when the
/// new name is free; when a key of the new name exists (a process of the new release ran
/// before the migration), a hash gains the fields it lacks, a set the members, a string (a
/// lease, which expires anyway) is dropped, and two streams are left alone.
/// KEYS: old, new. Returns 1 when moved, 0 when the old key is gone, -1 when left.
pub(crate) static MOVE_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= redis.call('TYPE', KEYS[2])['ok'] or kind == 'stream' then return -1 end
if kind == 'hash' then
  local kv = redis.call('HGETALL', KEYS[1])
  for i = 1, #kv, 2 do redis.call('HSETNX', KEYS[2], kv[i], kv[i + 1]) end
elseif kind == 'set' then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// Moves one dead-letter record back into a stream, in one step, so that a replay interrupted
/// anywhere never publishes a record twice nor loses one: if the record is still in the
/// dead-letter stream, adds the entry (`MAXLEN ~` when a length is given) and deletes the
/// record. KEYS: dead-letter stream, target stream (in one slot). ARGV: record id, max length
/// (`''` for none), then the entry's fields and values. Returns the new entry's id, or nil
/// when the record was gone (replayed or purged by another run).
pub(crate) static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return false
end
local add = {'XADD', KEYS[2]}
if ARGV[2] ~= '' then
  table.insert(add, 'MAXLEN')
  table.insert(add, '~')
  table.insert(add, ARGV[2])
end
table.insert(add, '*')
for i = 3, #ARGV do
  table.insert(add, ARGV[i])
end
local id = redis.call(unpack(add))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
",
    )
});

/// Lua functions of the guarded repairs: `live(registry, lease prefix)`, the consumers of a
/// registry whose lease key is there, as flat `name, token, pttl` triples; `cmp_id(a, b)`,
/// -1, 0 or 1 as entry id `a` is below, equal to or above `b` (compared as decimal text, so
/// that ids beyond 2^53 compare right).
const GUARD_FUNCTIONS: &str = r"
local function live(registry, prefix)
  local found = {}
  for _, name in ipairs(redis.call('SMEMBERS', registry)) do
    local key = prefix .. name
    local token = redis.call('GET', key)
    if token then
      table.insert(found, name)
      table.insert(found, token)
      table.insert(found, redis.call('PTTL', key))
    end
  end
  return found
end
local function cmp_num(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function cmp_id(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  local c = cmp_num(am, bm)
  if c ~= 0 then return c end
  return cmp_num(as, bs)
end
-- What group `g` (an XINFO GROUPS row) of stream `key` still needs: its oldest pending entry
-- and, when it has live consumers, the first entry it has not been delivered; nothing when it
-- has no live consumer and every consumer it has idled past `idle_age` ms (a group with a
-- live consumer always holds back, however long it has not read). Returns the group's name,
-- the first needed id (or nil), its live consumers as in `live`, and whether it was let go as
-- idle.
local function needed_by(key, g, idle_age, registry_prefix, lease_prefix)
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local found = live(registry_prefix .. name, lease_prefix .. name .. ':')
  if #found == 0 then
    local least_idle = nil
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, name)) do
      for i = 1, #c, 2 do
        if c[i] == 'idle' and (not least_idle or c[i + 1] < least_idle) then least_idle = c[i + 1] end
      end
    end
    if least_idle and least_idle > idle_age then return name, nil, found, true end
  end
  local first = nil
  local p = redis.call('XPENDING', key, name, '-', '+', 1)
  if p[1] then first = p[1][1] end
  if #found > 0 then
    local u = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
    if u[1] and (not first or cmp_id(u[1][1], first) < 0) then first = u[1][1] end
  end
  return name, first, found, false
end
";

/// Moves a group's last delivered id, unless (not forced) a consumer of the group holds a live
/// lease: the check and the move in one step, so that no consumer can start between them.
/// KEYS: stream, the group's lease registry. ARGV: group, id, the group's lease key prefix,
/// `1` to force. Returns an empty array when moved, else the live consumers as flat
/// `name, token, pttl` triples (nothing moved).
pub(crate) static GUARDED_SETID: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{GUARD_FUNCTIONS}{}",
        r"
if ARGV[4] ~= '1' then
  local found = live(KEYS[2], ARGV[3])
  if #found > 0 then return found end
end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[2])
return {}
"
    ))
});

/// Trims a stream below an id (`XTRIM MINID`, exact), unless (not forced) that would remove
/// an entry a group still needs (`needed_by`: its oldest pending entry, or, with live
/// consumers, the first it has not been delivered; nothing once all its consumers idled past
/// the age). The check and the trim in one step, so that no consumer can start or read
/// between them. KEYS: stream. ARGV: the id, `1` to force, the stream's registry prefix, its
/// lease key prefix, the idle age in ms. Returns `{removed}`, or, nothing removed, `{-1, the
/// first needed id, {groups that need it}, {per such group, its live consumers as flat
/// name, token, pttl triples}}`.
pub(crate) static GUARDED_TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{GUARD_FUNCTIONS}{}",
        r"
if ARGV[2] ~= '1' then
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if ok then
    local idle_age = tonumber(ARGV[5])
    local needed, protecting, lives = nil, {}, {}
    for _, g in ipairs(groups) do
      local name, first, found = needed_by(KEYS[1], g, idle_age, ARGV[3], ARGV[4])
      if first and cmp_id(ARGV[1], first) > 0 then
        if not needed or cmp_id(first, needed) < 0 then needed = first end
        table.insert(protecting, name)
        table.insert(lives, found)
      end
    end
    if needed then return {-1, needed, protecting, lives} end
  end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])}
"
    ))
});

/// Moves a topic's delayed messages that are due (on the server's clock) into the topic, in
/// due order, each exactly once: its `XADD` and its removal from the schedule are one step, so
/// several movers never append one twice, and a mover that dies mid-way leaves the rest
/// scheduled. A member is a 16-byte token, then the entry's field names and values, each as
/// `<length>:<bytes>` ([`super::scheduled`]). KEYS: schedule, topic. ARGV: most to move.
/// Returns `{moved, next due ms or -1, now ms}`.
pub(crate) static MOVE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local fields = {}
  local at = 17
  while at <= #member do
    local colon = string.find(member, ':', at, true)
    if not colon then break end
    local len = tonumber(string.sub(member, at, colon - 1))
    if not len then break end
    table.insert(fields, string.sub(member, colon + 1, colon + len))
    at = colon + len + 1
  end
  if #fields >= 2 and #fields % 2 == 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('ZREM', KEYS[1], member)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
return {#due, next_due, now}
",
    )
});

/// Applies a stream's retention (`MINID`) and length limit in one step, safely unless forced:
/// never below an entry a group still needs, its oldest pending entry or (for a group with
/// live consumers) the first it has not been delivered, except for groups whose consumers
/// have all been idle longer than the given age, which no longer hold it back. The cut is the
/// later of the two limits; it moves back to the earliest entry still needed. KEYS: stream.
/// ARGV: retention's first id to keep (`''`: none), the length limit (0: none), `1` to force,
/// the idle age in ms past which a group does not hold back, the stream's registry prefix,
/// its lease key prefix. Returns `{removed, held back: 0 or 1, {groups ignored as idle}}`.
pub(crate) static SAFE_TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{GUARD_FUNCTIONS}{}",
        r"
local cut = nil
if ARGV[1] ~= '' then cut = ARGV[1] end
local max_length = tonumber(ARGV[2])
if max_length > 0 then
  local excess = redis.call('XLEN', KEYS[1]) - max_length
  if excess > 0 then
    local r = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', math.min(excess, 10000))
    local m, q = string.match(r[#r][1], '^(%d+)-(%d+)$')
    local after = m .. '-' .. (tonumber(q) + 1)
    if not cut or cmp_id(after, cut) > 0 then cut = after end
  end
end
if not cut then return {0, 0, {}} end
local held, ignored = 0, {}
if ARGV[3] ~= '1' then
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if not ok then return {0, 0, {}} end
  local idle_age = tonumber(ARGV[4])
  for _, g in ipairs(groups) do
    local name, first, _, idle = needed_by(KEYS[1], g, idle_age, ARGV[5], ARGV[6])
    if idle then
      table.insert(ignored, name)
    elseif first and cmp_id(first, cut) < 0 then
      cut = first
      held = 1
    end
  end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', cut), held, ignored}
"
    ))
});
