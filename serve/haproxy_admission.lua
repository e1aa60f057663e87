-- detserve's admission, compared in HAProxy itself (serve/ingress.py loads it into the config Ray writes).
--
-- The constants above are generated from Python: the registry's (the detserve table: header names, the error
-- body, the 503's text; detserve.serve.protocol.lua_prelude) and admission's (HEADER, FRESH_S;
-- detserve.serve.proxy_admission.render_lua). This file is not loaded without them.
--
-- Why here: a request the replica refuses has already cost the replica's Python HTTP server the whole request,
-- on the cores the engine needs. So each replica sends, with every /predict answer, its outlook (HEADER):
-- refuse a one-image request arriving before open_at, or one whose client timeout ends before need_until,
-- unless that timeout is under least_timeout (serve/admission.py, Outlook). This action compares a request's arrival with it and does nothing else. It
-- refuses only when every UP server of the backend that reported within FRESH_S would refuse; an outlook only
-- ages towards leniency, so HAProxy lets through what the replica may still refuse, never the other way.

-- backend name -> server name -> {open_at, need_until, spread, heard}
local reports = {}

local function now_s()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

local function parse(value)
    local open_at = tonumber(string.match(value, "open_at=([^;]+)") or "")
    local need_until = tonumber(string.match(value, "need_until=([^;]+)") or "")
    local least_timeout = tonumber(string.match(value, "least_timeout=([^;]+)") or "")
    local spread = tonumber(string.match(value, "spread=([^;]+)") or "")
    local max_timeout = tonumber(string.match(value, "max_timeout=([^;]+)") or "")
    if open_at == nil or need_until == nil or least_timeout == nil or spread == nil or max_timeout == nil then
        return nil
    end
    return {open_at = open_at, need_until = need_until, least_timeout = least_timeout, spread = spread,
            max_timeout = max_timeout}
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

local function server_up(backend, server)
    local be = core.backends[backend]
    local srv = be and be.servers[server]
    if srv == nil then
        return false
    end
    local status = srv:get_stats()["status"] or ""
    return string.sub(status, 1, 2) == "UP"
end

local function refuses(report, now, client_s)
    if client_s ~= nil and (client_s < report.least_timeout or client_s > report.max_timeout) then
        return false  -- too short even for an idle replica, or past the app's own timeout: the app says why (a 422)
    end
    if now < report.open_at then
        return true
    end
    return client_s ~= nil and now + client_s < report.need_until
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
    local header = txn.f:req_hdr(detserve.timeout_header)
    local client_s = nil
    if header ~= nil then
        local plain = false
        for _, pattern in ipairs(detserve.decimal_patterns) do
            plain = plain or string.match(header, pattern) ~= nil
        end
        client_s = plain and tonumber(header) or nil
        if client_s == nil or client_s <= 0 then
            return  -- not a usable deadline: the request goes on, and the app answers it with a 422
        end
    end
    local refusing, soonest = 0, nil
    for server, report in pairs(known) do
        if now - report.heard <= FRESH_S and server_up(backend, server) and refuses(report, now, client_s) then
            refusing = refusing + 1
            if soonest == nil or report.open_at < soonest.open_at then
                soonest = report
            end
        end
    end
    if refusing < up then
        return  -- some replica has room (or has not reported): the replica decides
    end
    local retry = math.max(1, math.ceil(math.max(0, soonest.open_at - now) + math.random() * soonest.spread))
    local message = string.format(detserve.overloaded_format, detserve.ingress_refusal, tostring(retry))
    local reply = txn:reply({
        status = detserve.status.overloaded,
        reason = "Service Unavailable",
        headers = {["content-type"] = {"application/json"}, ["retry-after"] = {tostring(retry)},
                   [detserve.refused_by_header] = {"haproxy"}},
        body = detserve.error_body("overloaded", message),
    })
    txn:done(reply)
end)
