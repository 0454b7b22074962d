-- wrk: GET a random reader's home timeline (50 posts) with their token.
local users = {}
local limit = os.getenv("LOADLAB_BENCH_LIMIT") or "50"

function init(args)
  for line in io.lines(os.getenv("LOADLAB_BENCH_USERS")) do
    local id, token = line:match("^(%d+) (%S+)$")
    if id then users[#users + 1] = { id, token } end
  end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local u = users[math.random(#users)]
  return wrk.format("GET", "/v1/users/" .. u[1] .. "/timeline?limit=" .. limit,
    { ["Authorization"] = "Bearer " .. u[2] })
end
