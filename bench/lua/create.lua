-- POST distinct Patients: wrk -s create.lua URL -- TAG [PATH]
-- Every body differs (identifier value TAG-thread-n, name, birth date), TAG differs per run.
-- PATH defaults to /fhir/Patient; the bare endpoint gets the same bodies at /bare.
local n = 0
local tag = "run"
local path = "/fhir/Patient"
local threads = 0
local families = {"Müller", "Dubois", "Rossi", "García", "Novak", "Jensen", "Kowalski", "Smith"}
local givens = {"Anna", "Ben", "Chloé", "David", "Emma", "Farid", "Greta", "Hugo", "Inès", "Jonas"}
local template = '{"resourceType":"Patient","identifier":[{"use":"usual","type":{"coding":[' ..
  '{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR"}]},' ..
  '"system":"urn:oid:1.2.36.146.595.217.0.1","value":"%s-%d"}],"active":true,' ..
  '"name":[{"family":"%s","given":["%s"]}],"gender":"female","birthDate":"%d-%02d-%02d",' ..
  '"telecom":[{"system":"phone","value":"+41 44 %07d","use":"home"}],' ..
  '"address":[{"line":["%d Main Street"],"city":"Zürich","postalCode":"8001"}]}'
local headers = {["Content-Type"] = "application/fhir+json", ["Accept"] = "application/fhir+json"}

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  tag = (args[1] or "run") .. "-" .. (tid or 0)
  path = args[2] or path
end

function request()
  n = n + 1
  local body = string.format(template, tag, n, families[n % #families + 1], givens[n % #givens + 1],
    1930 + n % 85, n % 12 + 1, n % 28 + 1, 1000000 + n % 8999999, n % 200 + 1)
  return wrk.format("POST", path, headers, body)
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")  -- done(): the report
