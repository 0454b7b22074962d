-- wrk: a random poster (100 followers each) creates a post.
local users = {}
local n = 0

function init(args)
  for line in io.lines(os.getenv("LOADLAB_BENCH_USERS")) do
    local id, token = line:match("^(%d+) (%S+)$")
    if id then users[#users + 1] = { id, token } end
  end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local u = users[math.random(#users)]
  n = n + 1
  return wrk.format("POST", "/v1/posts",
    { ["Authorization"] = "Bearer " .. u[2], ["Content-Type"] = "application/json" },
    '{"body":"benchmark post ' .. n .. '"}')
end
