-- detserve's admission, applied in HAProxy itself (serve/ingress.py loads it into the config Ray writes).
--
-- Why: a request the replica refuses has already cost the replica's Python HTTP server the
-- whole request (about 5-8 CPU-ms here, on the cores the engine needs). Under 2x overload that is
-- half the arrivals. So each replica tells HAProxy, on every /predict answer, when it will next
-- have room (the x-detserve-admit header, built by RouteAdmission.outlook in
-- serve/proxy_admission.py), and HAProxy answers the requests that arrive before then with the
-- same JSON 503 and Retry-After, in C and Lua, without a byte reaching Python.
--
-- The rule is the replica's (detserve.serve.scheduler.late_by) for a one-image request:
--   refused when  now < until            (a request already queued would miss its deadline)
--            or   finish - now > headroom * budget   (this request would miss its own)
-- where finish is when the replica's queue (and this image) is done, and budget is the server's,
-- or the client's x-request-timeout-seconds less the margin when that is shorter. Requests are
-- refused here only when every server of the backend that reported within FRESH_S says so; the
-- report is a little old by the time it is used (the replica admitted more since), so HAProxy is
-- more lenient than the replica, never stricter, and the replica's own check stays the bound.

local HEADER = "x-detserve-admit"
local FRESH_S = 5.0
local REFUSED_HERE = "refused at the ingress, before the app"  -- = proxy_admission.REFUSED_HERE

-- backend name -> server name -> report; backend name -> next free Retry-After slot (RetrySlots)
local reports, next_free = {}, {}

local function now_s()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

local function parse(value)
    local report = {}
    for key, number in string.gmatch(value, "(%w+)=([^;]+)") do
        report[key] = tonumber(number)
    end
    for _, key in ipairs({"finish", "until", "budget", "headroom", "margin", "alone", "rate"}) do
        if report[key] == nil then
            return nil
        end
    end
    return report
end

core.register_action("detserve_heard", {"http-res"}, function(txn)
    local value = txn.f:res_hdr(HEADER)  -- one fetch, not a table of every header
    txn.http:res_del_header(HEADER)
    if value == nil then
        return
    end
    local backend, server = txn.f:be_name(), txn.f:srv_name()
    local report = parse(value)
    if backend == nil or server == nil or report == nil then
        return
    end
    report.heard = now_s()
    reports[backend] = reports[backend] or {}
    reports[backend][server] = report
end)

-- Seconds until a one-image request with ``client_s`` (or none) would be admitted by ``report``; nil: admitted now.
local function wait_for(report, now, client_s)
    if now - report.heard > FRESH_S or report.rate <= 0 then
        return nil
    end
    local budget = report.budget
    if client_s ~= nil and client_s > 0 and client_s - report.margin < budget then
        budget = math.max(0, client_s - report.margin)
    end
    if report.alone > budget then
        return nil  -- hopeless even alone: the replica answers it 422 with the reason
    end
    local wait = math.max(report["until"] - now, report.finish - now - report.headroom * budget)
    if wait <= 0 then
        return nil
    end
    return wait, report
end

local function server_up(backend, server)
    local be = core.backends[backend]
    local srv = be and be.servers[server]
    if srv == nil then
        return false
    end
    local status = srv:get_stats()["status"] or ""
    return string.sub(status, 1, 2) == "UP"
end

core.register_action("detserve_admit", {"http-req"}, function(txn)
    local path = string.gsub(txn.f:path() or "", "/+$", "")
    if string.sub(path, -8) ~= "/predict" then
        return
    end
    local backend = txn.f:be_name()
    local known = backend and reports[backend]
    if known == nil then
        return
    end
    local up = txn.f:nbsrv(backend) or 0
    if up < 1 then
        return  -- HAProxy's own 503 (no replica) applies
    end
    local now = now_s()
    local client_s = tonumber(txn.f:req_hdr("x-request-timeout-seconds") or "")
    if client_s ~= nil and client_s ~= client_s then
        client_s = nil  -- NaN
    end
    local refusing, soonest, ahead = 0, math.huge, nil
    for server, report in pairs(known) do
        local wait, used = wait_for(report, now, client_s)
        if wait ~= nil and server_up(backend, server) then
            refusing = refusing + 1
            if wait < soonest then
                soonest, ahead = wait, used
            end
        end
    end
    if refusing < up then
        return  -- some replica has room (or has not reported): the replica decides
    end
    -- Spread the Retry-After of a burst's refusals at the rate the replicas take requests back
    -- (serve/scheduler.py, RetrySlots): the same drain for all would bring them back together.
    local budget = ahead.budget
    local soonest_at = now + soonest
    local at = math.min(math.max(soonest_at, next_free[backend] or -math.huge), soonest_at + budget)
    next_free[backend] = at + 1 / ahead.rate
    local retry = math.max(1, math.ceil(at - now))
    local message = string.format(
        "the server is busy: the images queued ahead would take %.1f s, past the deadline (%s). "
            .. "Retry after %d s (the Retry-After header), or send fewer images per request",
        math.max(0, ahead.finish - now), REFUSED_HERE, retry)
    local body = '{"error": {"code": "overloaded", "message": "' .. message .. '"}}'
    local reply = txn:reply({
        status = 503,
        reason = "Service Unavailable",
        headers = {["content-type"] = {"application/json"}, ["retry-after"] = {tostring(retry)},
                   ["x-detserve-refused-by"] = {"haproxy"}},
        body = body,
    })
    txn:done(reply)
end)
