//! HTTP APIs through the gateway: per-request policy, a credential the workload never holds,
//! and one audit record per request. The "API" is a local TLS mock named api.openai.com (the
//! test-only resolver override points the name at it; the gateway trusts its test CA).
use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Duration,
};

use sha2::{Digest, Sha256};
use tollgate_tests::{join_before_exec, run_in, TestEnv, TlsApi};

const POLICY: &str = "apiVersion: tollgate/v1
kind: EgressPolicy
metadata: { name: agent }
spec:
  workload: { cgroup: ROOT/agent.service }
  egress:
    - name: openai
      match: { host: api.openai.com, port: 80 }
      upstream: { port: 443 }
      tls: originate
      http:
        - methods: [POST]
          paths: [/v1/chat/completions]
        - methods: [GET]
          paths: [/v1/models/*, /v1/events]
          forbid_headers: [x-debug-bypass]
        - methods: [POST]
          paths: [/v1/responses]
          models: [gpt-4o-mini, o3-*]
      credential: openai-prod
    - name: budgeted
      match: { host: api.openai.com, port: 8080 }
      upstream: { port: 443 }
      tls: originate
      credential: openai-prod
      budget: { requests: 3, per: 1h }
    - name: tokens
      match: { host: api.openai.com, port: 8081 }
      upstream: { port: 443 }
      tls: originate
      http:
        - methods: [POST]
          paths: [/v1/responses]
          models: [\"*\"]
      credential: openai-prod
      budget: { tokens: 100, per: 1h, reserve_output: 10 }
    - name: maps
      match: { host: maps.example, port: 80 }
      upstream: { port: 443 }
      tls: originate
      credential: maps-key
    - name: openai-tls
      match: { host: api.openai.com, port: 443 }
      tls: passthrough
    - name: down
      match: { host: down.example, port: 80 }
      upstream: { port: 443 }
      tls: originate
";

fn private_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Setup {
    env: TestEnv,
    api: TlsApi,
    secret: String,
    agent: std::path::PathBuf,
    other: std::path::PathBuf,
    go: std::path::PathBuf,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "")
}

/// As [`setup`], with `extra` lines in the daemon config.
fn setup_with(name: &str, extra: &str) -> Setup {
    let mut env = TestEnv::new(name);
    let agent = env.workload("agent.service");
    let other = env.workload("other.service");
    let go = env.dir.join("go");
    let api = TlsApi::start(
        &["api.openai.com", "maps.example", "down.example"],
        go.clone(),
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .subsec_nanos();
    let secret = format!("sk-test-{}-{nanos}", std::process::id());
    tollgate_tests::register_secret(&secret);
    private_file(&env.dir.join("openai.key"), &secret);
    private_file(
        &env.dir.join("credentials.yaml"),
        "bindings:\n  - name: openai-prod\n    hosts: [api.openai.com]\n    inject: { header: Authorization, format: \"Bearer {secret}\" }\n    source: { file: openai.key }\n  - name: maps-key\n    hosts: [maps.example]\n    inject: { query: key }\n    source: { file: openai.key }\n",
    );
    std::fs::write(env.dir.join("ca.pem"), &api.ca_pem).expect("ca");
    let closed = tollgate_tests::free_port();
    env.write_config(&format!(
        "credentials: {}\nupstream_ca: {}\ntest_resolver: {{ \"api.openai.com:443\": \"{a}\", \"maps.example:443\": \"{a}\", \"down.example:443\": \"127.0.0.1:{closed}\" }}\n{extra}",
        env.dir.join("credentials.yaml").display(),
        env.dir.join("ca.pem").display(),
        a = api.addr
    ));
    std::fs::write(
        env.policies.join("agent.yaml"),
        POLICY.replace("ROOT", &env.root_rel()),
    )
    .expect("policy");
    Setup {
        env,
        api,
        secret,
        agent,
        other,
        go,
    }
}

fn curl(cgroup: &std::path::Path, args: &[&str]) -> (String, String) {
    let mut all = vec![
        "-sS",
        "--max-time",
        "10",
        "--resolve",
        "api.openai.com:80:127.0.0.9",
        "--resolve",
        "evil.example:80:127.0.0.9",
        "--resolve",
        "maps.example:80:127.0.0.9",
        "--resolve",
        "down.example:80:127.0.0.9",
    ];
    all.extend_from_slice(args);
    let out = run_in(cgroup, "curl", &all);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `POST /v1/chat/completions` with `{}` from `cgroup` through curl; the output ends with the
/// status code on a line of its own.
fn chat(cgroup: &std::path::Path) -> (String, String) {
    curl(
        cgroup,
        &[
            "-X",
            "POST",
            "-d",
            "{}",
            "-w",
            "\n%{http_code}",
            "http://api.openai.com/v1/chat/completions",
        ],
    )
}

#[test]
fn the_workload_never_holds_the_key_and_every_request_is_decided() {
    let s = setup("http");
    let env = &s.env;
    // A canary where the workload thinks the API is: the credential must never go there.
    let canary = TcpListener::bind("127.0.0.9:80").expect("canary on 127.0.0.9:80");
    canary.set_nonblocking(true).expect("nonblocking");
    let _d = env.start();
    let want_auth = hex(&Sha256::digest(format!("Bearer {}", s.secret).as_bytes()));
    let url = |p: &str| format!("http://api.openai.com{p}");
    let mut outputs = String::new();

    // Injection, with a caller-sent Authorization replaced.
    let (out, err) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer attacker",
            "-H",
            "x-api-key: stolen",
            "-H",
            "api-key: stolen-too",
            "-H",
            "X-Tollgate-Identity: admin",
            "-H",
            "X-Forwarded-For: 127.0.0.66",
            "-d",
            "{\"model\":\"m\"}",
            &url("/v1/chat/completions"),
        ],
    );
    outputs.push_str(&out);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(
        v["auth_sha256"], want_auth,
        "the upstream got the bound key, not the caller's"
    );
    assert_eq!(v["host"], "api.openai.com");
    assert_eq!(v["path"], "/v1/chat/completions");
    let head = s.api.requests().last().cloned().expect("request");
    assert!(
        !head.to_ascii_lowercase().contains("x-api-key")
            && !head.to_ascii_lowercase().contains("api-key:")
            && !head.contains("stolen"),
        "caller credentials removed: {head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("x-tollgate-"),
        "identity claims from the workload are dropped: {head}"
    );
    let rec = env.wait_record("the first allow", |r| {
        r["layer"] == "request" && r["decision"] == "allow"
    });
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/agent.service", env.root_rel()),
        "identity is the kernel's, whatever the headers say"
    );
    assert!(
        !rec.to_string().contains("127.0.0.66") && !rec.to_string().contains("admin"),
        "X-Forwarded-For and X-Tollgate-* claim nothing in the record: {rec}"
    );

    // python3, no key at all: urllib and requests. They resolve the name themselves: give them
    // the address curl was given, through an /etc/hosts bound over the real one in the
    // client's own mount namespace.
    let hosts = env.dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.9 api.openai.com\n").expect("hosts");
    let python = |script: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/hosts && exec python3 -c \"$0\"",
                hosts.display()
            ))
            .arg(script);
        join_before_exec(&mut cmd, &s.agent);
        let out = cmd.output().expect("python3");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let chat = "http://api.openai.com/v1/chat/completions";
    for (client, script) in [
        ("urllib", format!("import urllib.request\nr=urllib.request.Request('{chat}', data=b'{{}}', method='POST')\nprint(urllib.request.urlopen(r).read().decode())")),
        ("requests", format!("import requests\nprint(requests.post('{chat}', json={{}}, headers={{'Authorization': 'Bearer tollgate:openai-prod'}}).text)")),
    ] {
        let (out, err) = python(&script);
        outputs.push_str(&out);
        assert!(out.contains(&want_auth), "python3 {client}: {out} {err}");
    }
    // A Rust client (hyper).
    let rust = run_in(
        &s.agent,
        tollgate_tests::probe_bin()
            .with_file_name("tg-http")
            .to_str()
            .expect("path"),
        &["POST", chat, "127.0.0.9:80", "{}"],
    );
    let rust_out = String::from_utf8_lossy(&rust.stdout).into_owned();
    outputs.push_str(&rust_out);
    assert!(
        rust_out.starts_with("200") && rust_out.contains(&want_auth),
        "rust client: {rust_out} {}",
        String::from_utf8_lossy(&rust.stderr)
    );

    // Path normalized before matching, and forwarded normalized.
    let (out, _) = curl(
        &s.agent,
        &[
            "--path-as-is",
            "-X",
            "POST",
            "-d",
            "{}",
            &url("/v1/files/../chat//completions"),
        ],
    );
    outputs.push_str(&out);
    assert!(out.contains("\"path\":\"/v1/chat/completions\""), "{out}");

    // Denials: path, method, header, host, encoded separator, smuggling.
    let denied = [
        (
            vec!["-H", "X-Debug-Bypass: 1", "-w", "\n%{http_code}"],
            "/v1/models/x",
            "403",
            "headers_not_allowed",
        ),
        (
            vec!["-X", "GET", "-w", "\n%{http_code}"],
            "/v1/files",
            "403",
            "method_or_path_not_allowed",
        ),
        (
            vec!["-X", "GET", "-w", "\n%{http_code}"],
            "/v1/chat/completions",
            "403",
            "method_or_path_not_allowed",
        ),
        (
            vec!["--path-as-is", "-X", "POST", "-w", "\n%{http_code}"],
            "/v1/chat%2fcompletions",
            "400",
            "encoded_separator_in_path",
        ),
    ];
    for (mut args, path, code, reason) in denied {
        let u = url(path);
        args.push(&u);
        let (out, _) = curl(&s.agent, &args);
        outputs.push_str(&out);
        assert!(out.ends_with(code), "{path}: {out}");
        assert!(out.contains(reason), "{path}: {out}");
    }
    let (out, _) = curl(
        &s.agent,
        &[
            "-w",
            "\n%{http_code}",
            "http://evil.example/v1/chat/completions",
        ],
    );
    assert!(
        out.ends_with("403") && out.contains("host_not_allowed"),
        "{out}"
    );
    let smuggle = "import socket\ns=socket.create_connection(('127.0.0.9',80))\ns.sendall(b'POST /v1/chat/completions HTTP/1.1\\r\\nHost: api.openai.com\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n')\nprint(s.recv(4096).decode().split('\\r\\n')[0])";
    let out = run_in(&s.agent, "python3", &["-c", smuggle]);
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.starts_with("HTTP/1.1 400"), "CL+TE refused: {line:?}");

    // Keep-alive: one connection, several requests, each decided, injected and audited on its
    // own; ambiguous framing in a later request ends the connection.
    let (out, err) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "-d",
            "{}",
            "-w",
            "\nconnects=%{num_connects}\n",
            &url("/v1/chat/completions"),
            &url("/v1/chat/completions"),
        ],
    );
    outputs.push_str(&out);
    assert_eq!(
        out.matches(&want_auth).count(),
        2,
        "both injected: {out} {err}"
    );
    assert!(
        out.contains("connects=1") && out.contains("connects=0"),
        "curl reused its connection: {out}"
    );
    let keepalive = "import http.client
c=http.client.HTTPConnection('127.0.0.9',80,timeout=10)
c.connect()
port=c.sock.getsockname()[1]
for m,p,b in [('GET','/v1/files',None),('POST','/v1/chat/completions','{}'),('GET','/v1/models/x',None)]:
    c.request(m,p,body=b,headers={'Host':'api.openai.com'})
    r=c.getresponse()
    print(r.status, c.sock.getsockname()[1]==port, r.read().decode())
c.sock.sendall(b'POST /v1/chat/completions HTTP/1.1\\r\\nHost: api.openai.com\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n')
try:
    tail=c.sock.recv(4096)
except ConnectionResetError:
    tail=b''
print('after:', repr(tail))";
    let out = run_in(&s.agent, "python3", &["-c", keepalive]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    outputs.push_str(&text);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines[0].starts_with("403 True") && lines[0].contains("method_or_path_not_allowed"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("200 True") && lines[1].contains(&want_auth),
        "{text}"
    );
    assert!(
        lines[2].starts_with("200 True") && lines[2].contains(&want_auth),
        "{text}"
    );
    assert_eq!(
        lines[3], "after: b''",
        "no answer to the ambiguous request: {text}"
    );
    tollgate_tests::wait_for(10, "the later framing refusal", || {
        (env.records()
            .iter()
            .filter(|r| r["reason"] == "content_length_with_transfer_encoding")
            .count()
            >= 2)
            .then_some(())
    });

    // HTTP/2 with prior knowledge: decided and injected the same way.
    let (out, err) = curl(
        &s.agent,
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-d",
            "{}",
            &url("/v1/chat/completions"),
        ],
    );
    outputs.push_str(&out);
    assert!(out.contains(&want_auth), "h2: {out} {err}");
    let (out, _) = curl(
        &s.agent,
        &[
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_code}",
            &url("/v1/files"),
        ],
    );
    assert!(out.ends_with("403"), "h2 denial: {out}");

    // A workload without a policy gets nothing, at connect.
    let (out, err) = curl(
        &s.other,
        &["-X", "POST", "-d", "{}", &url("/v1/chat/completions")],
    );
    assert!(
        out.is_empty() && !err.is_empty(),
        "other.service: {out} {err}"
    );

    // An upstream that echoes the request: the key is masked in the response, in place, so
    // the response keeps the Content-Length the upstream gave it.
    let (out, _) = curl(&s.agent, &["-i", &url("/v1/models/echo")]);
    outputs.push_str(&out);
    assert!(out.contains("[REDACTED]"), "{out}");
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    assert_eq!(body.len(), length, "{out}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );

    // Server-sent events: the first event arrives before the upstream finishes.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sSN",
        "--max-time",
        "15",
        "--resolve",
        "api.openai.com:80:127.0.0.9",
        &url("/v1/events"),
    ])
    .stdout(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let mut sse = cmd.spawn().expect("curl -N");
    let mut reader = BufReader::new(sse.stdout.take().expect("stdout"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("first event");
    assert_eq!(first.trim(), "data: first");
    assert!(
        !s.go.exists(),
        "the upstream is still holding the stream open"
    );
    // The stream stays open a while: its audit record must cover all of it.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&s.go, "").expect("go");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    let _ = sse.wait();
    assert!(rest.contains("data: second"), "{rest}");

    // The workload's chosen address never saw a connection.
    let mut seen = 0;
    while canary.accept().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 0, "nothing was sent to 127.0.0.9");

    // One audit record per request, naming the binding, never its value.
    std::thread::sleep(Duration::from_millis(300));
    let records = env.records();
    let requests: Vec<_> = records.iter().filter(|r| r["layer"] == "request").collect();
    assert!(requests.len() >= 9, "{} request records", requests.len());
    let allowed = requests
        .iter()
        .find(|r| r["http"]["path"] == "/v1/chat/completions" && r["decision"] == "allow")
        .expect("allow record");
    assert_eq!(allowed["credential"], "openai-prod");
    assert_eq!(allowed["dst"]["host"], "api.openai.com");
    assert_eq!(allowed["http"]["status"], 200);
    assert_eq!(
        allowed["workload"]["cgroup"],
        format!("{}/agent.service", env.root_rel())
    );
    assert!(requests
        .iter()
        .any(|r| r["reason"] == "method_or_path_not_allowed" && r["http"]["status"] == 403));
    // Forwarded requests are recorded when their response ends: body bytes both ways and the
    // whole duration (the event stream was held open for 300 ms).
    for r in requests.iter().filter(|r| r["decision"] == "allow") {
        assert!(r["bytes_up"].is_u64() && r["bytes_down"].is_u64(), "{r}");
    }
    let stream = requests
        .iter()
        .find(|r| r["http"]["path"] == "/v1/events" && r["decision"] == "allow")
        .expect("the event stream's record");
    assert!(
        stream["duration_ms"].as_u64().unwrap_or(0) >= 300,
        "{stream}"
    );
    assert!(
        stream["bytes_down"].as_u64().unwrap_or(0)
            >= "data: first\n\ndata: second\n\n".len() as u64,
        "{stream}"
    );
    let audit_text = std::fs::read_to_string(&env.audit).expect("audit");
    let logs: String = std::fs::read_dir(&env.dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    // Kept for the scan that ends the test run, too.
    std::fs::write(env.dir.join("client-output.txt"), &outputs).expect("client output");
    for (what, text) in [
        ("audit log", &audit_text),
        ("daemon log", &logs),
        ("client output", &outputs),
    ] {
        assert!(
            !text.contains(&s.secret),
            "the secret appeared in the {what}"
        );
    }
}

#[test]
fn policy_rewritten_every_100ms_under_load_never_flips_a_decision() {
    let s = setup("reloadstorm");
    let env = &s.env;
    let _d = env.start();
    // Two valid policies that agree on chat (allowed) and /v1/files (denied) and differ on the
    // rest; a third edit is broken. The file is replaced atomically every 100 ms.
    let a = POLICY.replace("ROOT", &env.root_rel());
    let b = a.replace("paths: [/v1/models/*, /v1/events]", "paths: [/v1/events]");
    let broken = format!("{a}\n  nonsense: [\n");
    let path = env.policies.join("agent.yaml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        let path = path.clone();
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = [&a, &b, &broken][i % 3];
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, text).expect("write");
                std::fs::rename(&tmp, &path).expect("rename");
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            i
        })
    };
    // Load for 3 s on one kept-alive connection, in turn: chat (both policies allow),
    // /v1/files (both deny) and a model (allowed by one, denied by the other: it must get
    // one of the two answers, and both must be seen, or the swaps would not be live). The
    // daemon polls every 500 ms and catches whichever of the three edits stands then, so the
    // load goes on (up to 20 s) until the model has been answered both ways.
    let load = "import http.client, time
c=http.client.HTTPConnection('127.0.0.9',80,timeout=10)
good=bad=0
models={200:0,403:0}
start=time.time()
i=0
while time.time()<start+3 or (0 in models.values() and time.time()<start+20):
    m,p,want=[('POST','/v1/chat/completions',(200,)),('GET','/v1/files',(403,)),('GET','/v1/models/gpt-4o',(200,403))][i%3]
    c.request(m,p,body='{}' if m=='POST' else None,headers={'Host':'api.openai.com'})
    r=c.getresponse(); r.read()
    if r.status in want: good+=1
    else: bad+=1; print('unexpected',p,r.status)
    if i%3==2 and r.status in models: models[r.status]+=1
    i+=1
print('models',models[200],models[403])
print('good',good,'bad',bad)";
    let out = run_in(&s.agent, "python3", &["-c", load]);
    // Polls that happened to catch the same edits could leave one reload in the load's time:
    // the edits go on until two were applied and a broken one refused.
    tollgate_tests::wait_for(10, "two reloads and a refused one", || {
        (reloads(env, "policies_reloaded") >= 2 && reloads(env, "policy_reload_failed") >= 1)
            .then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    env.keep_client_output(&out.stdout);
    env.keep_client_output(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or_default();
    let good: u64 = last
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        last.ends_with("bad 0") && good > 100,
        "every request decided as both policies agree, no 5xx: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        writes >= 10,
        "the policy was rewritten throughout ({writes} writes)"
    );
    let models: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("models "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        models.len() == 2 && models[0] > 0 && models[1] > 0,
        "the path the policies disagree on was allowed and denied as they swapped: {text}"
    );
    // Each answer on that path was the decision of one policy or the other, audited so.
    let records = env.records();
    let on_models: Vec<_> = records
        .iter()
        .filter(|r| r["http"]["path"] == "/v1/models/gpt-4o")
        .collect();
    assert!(
        on_models
            .iter()
            .all(|r| (r["decision"] == "allow" && r["rule"] == "openai")
                || (r["decision"] == "deny"
                    && r["reason"] == "method_or_path_not_allowed"
                    && r["http"]["status"] == 403)),
        "{on_models:?}"
    );
    // Reloads happened, and the broken edit was refused each time it was seen.
    let reloads = records
        .iter()
        .filter(|r| r["layer"] == "lifecycle" && r["reason"] == "policies_reloaded")
        .count();
    assert!(reloads >= 2, "{reloads} reloads");
    assert!(
        records.iter().any(|r| r["layer"] == "lifecycle"
            && r["reason"]
                .as_str()
                .is_some_and(|x| x.starts_with("policy_reload_failed"))),
        "the broken edit was seen and refused"
    );
}

/// Waits until the daemon has reloaded policies `n` times.
fn wait_reloads(env: &TestEnv, reason: &str, n: usize) {
    tollgate_tests::wait_for(10, reason, || (reloads(env, reason) >= n).then_some(()));
}

/// How many reload records with `reason` the audit log holds.
fn reloads(env: &TestEnv, reason: &str) -> usize {
    env.records()
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|x| x.starts_with(reason)))
        .count()
}

/// Replaces a policy file the way an operator's tooling should: write aside, then rename.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn placeholders_redirects_query_keys_failures_monitor_and_reloads() {
    let s = setup("http2");
    let env = &s.env;
    let _d = env.start();
    let url = |h: &str, p: &str| format!("http://{h}{p}");
    let want_auth = hex(&Sha256::digest(format!("Bearer {}", s.secret).as_bytes()));
    let mut outputs = String::new();

    // A placeholder the SDK insists on is swapped where the policy binds that credential...
    let (out, _) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer tollgate:openai-prod",
            "-d",
            "{}",
            &url("api.openai.com", "/v1/chat/completions"),
        ],
    );
    outputs.push_str(&out);
    assert!(out.contains(&want_auth), "placeholder swapped: {out}");
    // ...and refused anywhere else.
    let (out, _) = curl(
        &s.agent,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "x-api-key: tollgate:openai-prod",
            &url("maps.example", "/v1/geocode"),
        ],
    );
    assert!(
        out.ends_with("403") && out.contains("placeholder_not_allowed"),
        "{out}"
    );

    // A credential injected as a query parameter: sent, redacted from the echo, never audited.
    let (out, _) = curl(&s.agent, &[&url("maps.example", "/v1/geocode?q=here")]);
    outputs.push_str(&out);
    assert!(
        out.contains("[REDACTED]") && out.contains("q=here"),
        "{out}"
    );
    let head = s.api.requests().last().cloned().expect("request");
    assert!(
        head.contains(&format!("key={}", s.secret)),
        "the upstream got the key in the query"
    );

    // A redirect to another host is passed back, never followed with the credential.
    let n = s.api.requests().len();
    let (out, _) = curl(
        &s.agent,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &url("api.openai.com", "/v1/models/redirect"),
        ],
    );
    assert_eq!(out, "302 https://evil.example/steal");
    assert_eq!(
        s.api.requests().len(),
        n + 1,
        "only the one request reached any upstream"
    );

    // An upstream that is down: 502 with a short reason.
    let (out, _) = curl(
        &s.agent,
        &["-w", "\n%{http_code}", &url("down.example", "/x")],
    );
    assert!(
        out.ends_with("502") && out.contains("upstream_unreachable"),
        "{out}"
    );

    // The secret file is replaced, as a rotation does it: the daemon re-reads it, and the new
    // key is what goes out from then on.
    let rotated = format!("{}-rotated", s.secret);
    tollgate_tests::register_secret(&rotated);
    let before = reloads(env, "policies_reloaded");
    let fresh = env.dir.join("openai-rotated.key");
    private_file(&fresh, &rotated);
    std::fs::rename(&fresh, env.dir.join("openai.key")).expect("rotate");
    wait_reloads(env, "policies_reloaded", before + 1);
    let (out, _) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "-d",
            "{}",
            &url("api.openai.com", "/v1/chat/completions"),
        ],
    );
    outputs.push_str(&out);
    let want_rotated = hex(&Sha256::digest(format!("Bearer {rotated}").as_bytes()));
    assert!(
        out.contains(&want_rotated),
        "the rotated key went out: {out}"
    );
    // Nothing else written beside the credentials (the audit log is) reloads them.
    let settled = reloads(env, "policies_reloaded");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        reloads(env, "policies_reloaded"),
        settled,
        "no reload without a change"
    );

    // Reload while a stream is in flight: the stream finishes; new requests see the new policy.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sSN",
        "--max-time",
        "15",
        "--resolve",
        "api.openai.com:80:127.0.0.9",
        &url("api.openai.com", "/v1/events"),
    ])
    .stdout(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let mut sse = cmd.spawn().expect("curl -N");
    let mut reader = BufReader::new(sse.stdout.take().expect("stdout"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("first event");
    assert_eq!(first.trim(), "data: first");
    let policy_path = env.policies.join("agent.yaml");
    let monitor = std::fs::read_to_string(&policy_path)
        .expect("policy")
        .replace("  egress:", "  mode: monitor\n  egress:")
        .replace("paths: [/v1/models/*, /v1/events]", "paths: [/v1/models/*]");
    let before = reloads(env, "policies_reloaded");
    replace_file(&policy_path, &monitor);
    wait_reloads(env, "policies_reloaded", before + 1);
    std::fs::write(&s.go, "").expect("go");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    let _ = sse.wait();
    assert!(
        rest.contains("data: second"),
        "the in-flight stream was not dropped: {rest}"
    );

    // Monitor mode: what the policy would deny goes through and is audited as would_deny.
    let (out, _) = curl(
        &s.agent,
        &["-w", "\n%{http_code}", &url("api.openai.com", "/v1/files")],
    );
    assert!(out.ends_with("200"), "monitor lets it through: {out}");
    let rec = env.wait_record("the would-deny record", |r| {
        r["decision"] == "would_deny" && r["http"]["path"] == "/v1/files"
    });
    assert_eq!(rec["reason"], "monitor:method_or_path_not_allowed");

    // A broken edit keeps the running policy (still monitor), and is audited.
    let before = reloads(env, "policy_reload_failed");
    replace_file(
        &policy_path,
        "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: [broken\n",
    );
    wait_reloads(env, "policy_reload_failed", before + 1);
    let (out, _) = curl(
        &s.agent,
        &["-w", "\n%{http_code}", &url("api.openai.com", "/v1/files")],
    );
    assert!(
        out.ends_with("200"),
        "the old (monitor) policy still decides: {out}"
    );

    let audit_text = std::fs::read_to_string(&env.audit).expect("audit");
    std::fs::write(env.dir.join("client-output.txt"), &outputs).expect("client output");
    for (what, text) in [("audit log", &audit_text), ("client output", &outputs)] {
        assert!(
            !text.contains(&s.secret),
            "the secret appeared in the {what}"
        );
    }
    let geocode = env
        .records()
        .into_iter()
        .find(|r| r["dst"]["host"] == "maps.example" && r["decision"] == "allow")
        .expect("maps record");
    assert_eq!(
        geocode["http"]["path"], "/v1/geocode",
        "the audited path carries no query"
    );
}

#[test]
fn tls_passthrough_decides_on_the_sni_and_dials_the_name() {
    let s = setup("passthrough");
    let env = &s.env;
    let canary = TcpListener::bind("127.0.0.9:443").expect("canary on 127.0.0.9:443");
    canary.set_nonblocking(true).expect("nonblocking");
    let _d = env.start();
    let ca = env.dir.join("ca.pem");
    let ca = ca.to_str().expect("path");
    // The client speaks TLS end to end with the API and verifies it itself; no key is added.
    let out = run_in(
        &s.agent,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca,
            "--resolve",
            "api.openai.com:443:127.0.0.9",
            "https://api.openai.com/v1/models/x",
        ],
    );
    env.keep_client_output(&out.stdout);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"path\":\"/v1/models/x\"") && text.contains("\"auth_sha256\":null"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another name: refused at the ClientHello.
    let out = run_in(
        &s.agent,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-k",
            "--resolve",
            "evil.example:443:127.0.0.9",
            "https://evil.example/",
        ],
    );
    env.keep_client_output(&out.stdout);
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "evil.example must be refused"
    );
    let rec = env.wait_record("the SNI refusal", |r| {
        r["dst"]["host"] == "evil.example" && r["decision"] == "deny"
    });
    assert_eq!(rec["reason"], "host_not_allowed");
    assert_eq!(rec["dst"]["protocol"], "tls");
    let ok = env.wait_record("the passthrough record", |r| {
        r["dst"]["host"] == "api.openai.com" && r["reason"] == "sni_allowed"
    });
    assert_eq!(ok["rule"], "openai-tls");
    assert!(ok["bytes_down"].as_u64().unwrap_or(0) > 0);
    // TLS on a port whose rule originates TLS itself is refused (the workload must speak HTTP).
    let out = run_in(
        &s.agent,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-k",
            "--resolve",
            "api.openai.com:80:127.0.0.9",
            "https://api.openai.com:80/",
        ],
    );
    env.keep_client_output(&out.stdout);
    assert!(!out.status.success());
    env.wait_record("the refusal", |r| r["reason"] == "tls_on_an_originate_rule");
    assert!(canary.accept().is_err(), "nothing was sent to 127.0.0.9");
}

/// Sends each raw request (one per connection) to where the workload thinks the API is and
/// prints, per request, a JSON line: the status line (empty if the gateway closed without
/// one) and how many bytes came back. An argument, if given, is how many seconds to wait
/// after each connect before sending.
const RAW_CLIENT: &str = r#"
import json, socket, sys, time
delay = float(sys.argv[1]) if len(sys.argv) > 1 else 0
for raw in json.load(sys.stdin):
    s = socket.create_connection(('127.0.0.9', 80), timeout=5)
    time.sleep(delay)
    s.sendall(raw.encode('latin-1'))
    got = b''
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
            if b'\r\n\r\n' in got and len(got) > 8192:
                break
    except socket.timeout:
        pass
    except ConnectionResetError:
        got = got or b'reset'
    s.close()
    print(json.dumps({'status': got.split(b'\r\n')[0].decode('latin-1'), 'bytes': len(got),
                      'response': got.decode('latin-1')}))
"#;

/// THREATS 18 and 20–22, end to end: requests that try to confuse framing, path or host. Each
/// fails closed (a refusal the gateway itself makes, nothing reaches the API), except the
/// harmless spellings, which are forwarded normalized.
#[test]
fn smuggling_path_and_host_tricks_fail_closed() {
    let s = setup("tricks");
    let env = &s.env;
    let _d = env.start();
    let post = |target: &str, host: &str, extra: &str, body: &str| {
        format!("POST {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n{body}")
    };
    let chat = "/v1/chat/completions";
    let api = "api.openai.com";
    // (case, raw request, expected status, audit reason; None = forwarded)
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        (
            "20: two different Content-Length",
            post(chat, api, "Content-Length: 2\r\nContent-Length: 3\r\n", "{}x"),
            "400",
            Some("duplicate_content_length"),
        ),
        (
            "20: CL and TE",
            post(chat, api, "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            "400",
            Some("content_length_with_transfer_encoding"),
        ),
        (
            "20: obfuscated TE (xchunked)",
            post(chat, api, "Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
            "400",
            Some("unsupported_transfer_encoding"),
        ),
        (
            "20: TE with a space before the colon",
            post(chat, api, "Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            "400",
            Some("whitespace_in_header_name"),
        ),
        (
            "20: TE chunked, identity",
            post(chat, api, "Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            "400",
            Some("unsupported_transfer_encoding"),
        ),
        (
            "20: bare LF chunk lines",
            // Found in the body as it streams past, after the head: the connection is closed
            // without a response.
            post(chat, api, "Transfer-Encoding: chunked\r\n", "2\n{}\n0\n\n"),
            "",
            Some("bare_lf_in_chunked_body"),
        ),
        (
            "21: .. out of an allowed prefix",
            "GET /v1/models/../files HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n".into(),
            "403",
            Some("method_or_path_not_allowed"),
        ),
        (
            "21: %2e%2e out of an allowed prefix",
            "GET /v1/models/%2e%2e/files HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n".into(),
            "403",
            Some("method_or_path_not_allowed"),
        ),
        (
            "21: mixed case",
            post("/V1/Chat/Completions", api, "Content-Length: 2\r\n", "{}"),
            "403",
            Some("method_or_path_not_allowed"),
        ),
        (
            "21: ;params",
            post("/v1/chat/completions;x=1", api, "Content-Length: 2\r\n", "{}"),
            "400",
            Some("bad_character_in_path"),
        ),
        (
            "21: trailing slash (forwarded, normalized)",
            post("/v1/chat/completions/", api, "Content-Length: 2\r\n", "{}"),
            "200",
            None,
        ),
        (
            "22: userinfo in Host",
            post(chat, "api.openai.com@evil.example", "Content-Length: 2\r\n", "{}"),
            "400",
            Some("userinfo_in_host"),
        ),
        (
            "18/22: absolute-form target naming another host",
            post("http://evil.example/v1/chat/completions", api, "Content-Length: 2\r\n", "{}"),
            "421",
            Some("absolute_target_host_mismatch"),
        ),
        (
            "22: two Host headers",
            post(chat, api, "Host: evil.example\r\nContent-Length: 2\r\n", "{}"),
            "400",
            Some("duplicate_host"),
        ),
        (
            "22: upper case and a trailing dot (forwarded, normalized)",
            post(chat, "API.OpenAI.com.", "Content-Length: 2\r\n", "{}"),
            "200",
            None,
        ),
        (
            "22: host:port (forwarded, normalized)",
            post(chat, "api.openai.com:80", "Content-Length: 2\r\n", "{}"),
            "200",
            None,
        ),
    ];
    let input = serde_json::to_string(
        &cases
            .iter()
            .map(|(_, raw, _, _)| raw.as_str())
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let before = s.api.requests().len();
    let mut child = Command::new("python3");
    child
        .args(["-c", RAW_CLIENT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut child, &s.agent);
    let mut child = child.spawn().expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("send requests");
    let out = child.wait_with_output().expect("python3");
    // Every response goes to the secret scan at the end of the run.
    std::fs::write(env.dir.join("client-output.txt"), &out.stdout).expect("client output");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.len(),
        cases.len(),
        "one answer per case: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forwarded = cases.iter().filter(|c| c.2 == "200").count();
    for ((case, _, code, reason), got) in cases.iter().zip(&lines) {
        let status = got["status"].as_str().unwrap_or("");
        if code.is_empty() {
            assert!(
                status.is_empty() || status == "reset",
                "{case}: closed, got {got}"
            );
        } else {
            assert!(
                status.starts_with(&format!("HTTP/1.1 {code}")),
                "{case}: expected {code}, got {got}"
            );
        }
        if let Some(reason) = reason {
            env.wait_record(case, |r| r["reason"] == *reason && r["decision"] == "deny");
        }
    }
    // 18 over HTTP/2: `:authority` and Host disagree, either way round (a Rust hyper client
    // with prior knowledge).
    let tg_http = tollgate_tests::probe_bin().with_file_name("tg-http");
    for (url, host) in [
        ("http://api.openai.com/v1/chat/completions", "evil.example"),
        ("http://evil.example/v1/chat/completions", "api.openai.com"),
    ] {
        let mut cmd = Command::new(&tg_http);
        cmd.args(["POST", url, "127.0.0.9:80", "{}"])
            .env("TG_HTTP_H2", "1")
            .env("TG_HTTP_HOST", host);
        join_before_exec(&mut cmd, &s.agent);
        let out = cmd.output().expect("tg-http");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("421") && text.contains("absolute_target_host_mismatch"),
            "h2 :authority {url} with Host {host}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 20 over HTTP/2: a request hyper refuses before any handler sees it (a connection-specific
    // header, forbidden in HTTP/2) is reset, and audited all the same.
    let mut cmd = Command::new("python3");
    cmd.args(["-c", H2_MALFORMED])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let out = cmd.output().expect("python3");
    env.keep_client_output(&out.stdout);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        got["reset"], 1,
        "the stream reset with PROTOCOL_ERROR: {got}"
    );
    let rec = env.wait_record("the malformed HTTP/2 request", |r| {
        r["reason"] == "h2_stream_reset_protocol_error"
    });
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert!(
        rec["workload"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("/agent.service")),
        "{rec}"
    );

    // Only the harmless spellings reached the API, normalized.
    let heads = s.api.requests();
    assert_eq!(heads.len() - before, forwarded, "{heads:#?}");
    for head in &heads[before..] {
        assert!(
            head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("host: api.openai.com\r\n"), "{head}");
        assert!(!lower.contains("evil.example"), "{head}");
    }
}

/// HTTP/2 with prior knowledge, by hand: one request whose header block carries
/// `connection: close` (connection-specific headers are malformed in HTTP/2). Prints the code
/// of the stream's reset (`{"reset": code}`), or what came instead.
const H2_MALFORMED: &str = r#"
import json, socket, struct
def frame(kind, flags, stream, payload):
    return struct.pack('>I', len(payload))[1:] + bytes([kind, flags]) + struct.pack('>I', stream) + payload
def lit(index, value):
    return bytes([index]) + bytes([len(value)]) + value
def lit_new(name, value):
    return b'\x00' + bytes([len(name)]) + name + bytes([len(value)]) + value
block = (b'\x82' + b'\x86' + lit(4, b'/v1/models/gpt-4o') + lit(1, b'api.openai.com')
         + lit_new(b'connection', b'close'))
s = socket.create_connection(('127.0.0.9', 80), timeout=5)
s.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + frame(4, 0, 0, b'') + frame(1, 5, 1, block))
buf = b''
result = {'closed': True}
try:
    while True:
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], 'big')
            if len(buf) < 9 + n:
                break
            kind, stream, payload = buf[3], int.from_bytes(buf[5:9], 'big') & 0x7fffffff, buf[9:9 + n]
            buf = buf[9 + n:]
            if kind == 3 and stream == 1:
                result = {'reset': int.from_bytes(payload[:4], 'big')}
                raise StopIteration
            if kind == 1 and stream == 1:
                result = {'headers': True}
                raise StopIteration
            if kind == 7:
                result = {'goaway': int.from_bytes(payload[4:8], 'big')}
                raise StopIteration
        data = s.recv(65536)
        if not data:
            break
        buf += data
except StopIteration:
    pass
print(json.dumps(result))
"#;

/// Holds N connections to where the workload thinks the API is, each sending a request head
/// one byte every 200 ms (slowloris), plus one kept-alive connection idle after a complete
/// request. Prints, per connection, when the gateway closed it (seconds since the start, or
/// -1 if it was still open after `limit` seconds).
const SLOWLORIS: &str = r#"
import json, select, socket, sys, time
n, limit = int(sys.argv[1]), float(sys.argv[2])
head = b'POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}'
start = time.monotonic()
conns = []
for _ in range(n):
    s = socket.create_connection(('127.0.0.9', 80))
    s.setblocking(False)
    conns.append(s)
idle = socket.create_connection(('127.0.0.9', 80))
idle.sendall(head)
first = idle.recv(65536)
idle.setblocking(False)
closed = {}
sent = 0
while time.monotonic() - start < limit and len(closed) < n + 1:
    if sent < len(head) - 1:
        for i, s in enumerate(conns):
            if i not in closed:
                try:
                    s.send(head[sent:sent + 1])
                except OSError:
                    closed[i] = time.monotonic() - start
        sent += 1
    live = [s for i, s in enumerate(conns) if i not in closed]
    if n not in closed:
        live.append(idle)
    r, _, _ = select.select(live, [], [], 0.2)
    for s in r:
        i = n if s is idle else conns.index(s)
        try:
            data = s.recv(65536)
        except OSError:
            data = b''
        if not data:
            closed[i] = time.monotonic() - start
print(json.dumps({
    'first': first.split(b'\r\n')[0].decode(),
    'slow': [closed.get(i, -1) for i in range(n)],
    'idle': closed.get(n, -1),
}))
"#;

/// A rule that limits models: the gateway reads the JSON body's `model` (HTTP/1.1 and HTTP/2),
/// forwards the body whole and as sent when the model is allowed, refuses any other model, a
/// body without one and one too large to read, and audits the model it read.
#[test]
fn models_are_read_from_the_body_where_a_rule_limits_them() {
    let s = setup("models");
    let env = &s.env;
    // Another workload's policy, in monitor mode: the same kind of rule, with a budget of 1.
    std::fs::write(
        env.policies.join("other.yaml"),
        MONITORED.replace("ROOT", &env.root_rel()),
    )
    .expect("policy");
    let _d = env.start();
    let url = "http://api.openai.com/v1/responses";
    let post_as = |who: &std::path::Path, body: &str, extra: &[&str]| {
        let mut args = vec!["-X", "POST", "-w", "\n%{http_code}"];
        if !extra.iter().any(|a| a.starts_with("Content-Type")) {
            args.extend_from_slice(&["-H", "Content-Type: application/json"]);
        }
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--data-binary", body, url]);
        let (out, err) = curl(who, &args);
        env.keep_client_output(out.as_bytes());
        let (body, code) = out
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("{out} {err}"));
        (code.to_owned(), body.to_owned())
    };
    let post = |body: &str, extra: &[&str]| post_as(&s.agent, body, extra);
    let model_records = |model: &str| {
        env.records()
            .into_iter()
            .filter(|r| r["layer"] == "request" && r["llm"]["model"] == model)
            .collect::<Vec<_>>()
    };
    let upstream_before = s.api.requests().len();

    // Allowed, exact and by pattern, over HTTP/1.1 (with a length or chunked) and HTTP/2:
    // the body arrives whole.
    let allowed = r#"{"model":"gpt-4o-mini","input":"hello"}"#;
    for (body, extra) in [
        (allowed, &[][..]),
        (r#"{"input":"hi","model":"o3-pro"}"#, &[][..]),
        (allowed, &["--http2-prior-knowledge"][..]),
        (allowed, &["-H", "Transfer-Encoding: chunked"][..]),
    ] {
        let (code, out) = post(body, extra);
        assert_eq!(code, "200", "{body} {extra:?}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("mock json");
        assert_eq!(v["body_len"], body.len(), "the body went on whole: {v}");
        assert!(v["auth_sha256"].is_string(), "the key was injected: {v}");
    }
    assert_eq!(s.api.requests().len(), upstream_before + 4);
    let rec = env.wait_record("the allowed model's record", |r| {
        r["llm"]["model"] == "o3-pro" && r["decision"] == "allow"
    });
    assert_eq!(rec["http"]["status"], 200, "{rec}");
    assert_eq!(rec["rule"], "openai", "{rec}");
    // The response's usage, read as it passed: the mock counts the request's bytes in, 7 out.
    let o3_body = r#"{"input":"hi","model":"o3-pro"}"#;
    assert_eq!(rec["llm"]["tokens_in"], o3_body.len(), "{rec}");
    assert_eq!(rec["llm"]["tokens_out"], 7, "{rec}");
    tollgate_tests::wait_for(10, "the three gpt-4o-mini records", || {
        (model_records("gpt-4o-mini").len() == 3).then_some(())
    });

    // Refused before anything goes upstream: another model, none, two, one too large.
    let big = format!(
        r#"{{"model":"gpt-4o-mini","input":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let big_file = env.dir.join("big.json");
    std::fs::write(&big_file, &big).expect("big body");
    let big_arg = format!("@{}", big_file.display());
    let form = ["-H", "Content-Type: application/x-www-form-urlencoded"];
    for (body, extra, want_code, reason) in [
        (
            r#"{"model":"gpt-4o","input":"hi"}"#,
            &[][..],
            "403",
            "model_not_allowed",
        ),
        // A reader that ignores case would take the second: there is no model.
        (
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#,
            &[][..],
            "403",
            "model_missing",
        ),
        // Not declared JSON: a form reader would see `model=gpt-4o`. Not read at all.
        (
            r#"{"model":"gpt-4o-mini","x":"&model=gpt-4o&"}"#,
            &form[..],
            "403",
            "model_missing",
        ),
        (r#"{"input":"hi"}"#, &[][..], "403", "model_missing"),
        (
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
            &[][..],
            "403",
            "model_missing",
        ),
        ("not json", &[][..], "403", "model_missing"),
        (
            big_arg.as_str(),
            &[][..],
            "413",
            "body_too_large_for_model_check",
        ),
    ] {
        let (code, out) = post(body, extra);
        assert_eq!(code, want_code, "{}: {out}", &body[..body.len().min(60)]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("denial json");
        assert_eq!(v["reason"], reason, "{v}");
        env.wait_record(reason, |r| r["layer"] == "request" && r["reason"] == reason);
    }
    assert_eq!(
        s.api.requests().len(),
        upstream_before + 4,
        "nothing refused reached the upstream"
    );
    let denied = model_records("gpt-4o");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["decision"], "deny");
    assert_eq!(
        denied[0]["workload"]["cgroup"],
        format!("{}/agent.service", env.root_rel())
    );
    // Method and path decide first: a request the rule's other entries allow reads no body.
    let rec_count = env.records().len();
    let (out, err) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "-d",
            "{}",
            "http://api.openai.com/v1/chat/completions",
        ],
    );
    env.keep_client_output(out.as_bytes());
    assert!(out.contains("auth_sha256"), "{out} {err}");
    let rec = tollgate_tests::wait_for(10, "the chat record", || {
        env.records()
            .into_iter()
            .skip(rec_count)
            .find(|r| r["http"]["path"] == "/v1/chat/completions")
    });
    assert!(
        rec.get("llm").is_none(),
        "no model read where no rule asks: {rec}"
    );

    // Monitor mode: another model, then a spent budget, forwarded with the body whole and
    // audited as what enforcement would have denied.
    let other = r#"{"model":"gpt-4o","input":"watched"}"#;
    for (body, reason) in [
        (other, "monitor:model_not_allowed"),
        (allowed, "rule_matched"),
        (allowed, "monitor:budget_exhausted"),
    ] {
        let (code, out) = post_as(&s.other, body, &[]);
        assert_eq!(code, "200", "{reason}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("mock json");
        assert_eq!(v["body_len"], body.len(), "{v}");
        let rec = env.wait_record(reason, |r| {
            r["policy"] == "other" && r["reason"] == reason && r["http"]["status"] == 200
        });
        let want = if reason == "rule_matched" {
            "allow"
        } else {
            "would_deny"
        };
        assert_eq!(rec["decision"], want, "{rec}");
    }
}

/// The policy of `other.service` in the models test: monitor mode, a model list and a budget.
const MONITORED: &str = "apiVersion: tollgate/v1
kind: EgressPolicy
metadata: { name: other }
spec:
  workload: { cgroup: ROOT/other.service }
  mode: monitor
  egress:
    - name: watched
      match: { host: api.openai.com, port: 80 }
      upstream: { port: 443 }
      tls: originate
      http:
        - methods: [POST]
          paths: [/v1/responses]
          models: [gpt-4o-mini]
      credential: openai-prod
      budget: { requests: 1, per: 1h }
";

/// A rule with a budget of 3 requests an hour: three go through, the next are refused with 429
/// and `Retry-After` before anything reaches the upstream, each audited; another rule's
/// requests are not counted against it. A rule with a budget of 100 tokens an hour is charged
/// what each answer's usage says, and refuses once it is spent.
#[test]
fn a_spent_budget_refuses_until_it_refills() {
    let mut s = setup("budget");
    // Two agents under one policy whose rule gives each of them a budget of its own.
    let team = [
        s.env.workload("team/a.service"),
        s.env.workload("team/b.service"),
        // A cgroup the first agent made inside its own.
        s.env.workload("team/a.service/inner"),
    ];
    std::fs::write(
        s.env.policies.join("team.yaml"),
        format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: team }}\nspec:\n  workload: {{ cgroup: {}/team }}\n  egress:\n    - name: each\n      match: {{ host: api.openai.com, port: 8082 }}\n      upstream: {{ port: 443 }}\n      tls: originate\n      credential: openai-prod\n      budget: {{ requests: 2, per: 1h, scope: workload }}\n",
            s.env.root_rel()
        ),
    )
    .expect("team policy");
    let env = &s.env;
    let _d = env.start();
    let call_from = |cgroup: &std::path::Path, port: u16| {
        let resolve = format!("api.openai.com:{port}:127.0.0.9");
        let url = format!("http://api.openai.com:{port}/v1/chat/completions");
        let (out, err) = curl(
            cgroup,
            &["-i", "--resolve", &resolve, "-X", "POST", "-d", "{}", &url],
        );
        env.keep_client_output(out.as_bytes());
        let status = out
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("{out} {err}"))
            .to_owned();
        (status, out)
    };
    let call = |port: u16| call_from(&s.agent, port);
    let before = s.api.requests().len();
    for i in 0..3 {
        let (status, out) = call(8080);
        assert_eq!(status, "200", "request {i} is within the budget: {out}");
    }
    for i in 0..2 {
        let (status, out) = call(8080);
        assert_eq!(status, "429", "request {} is over the budget: {out}", i + 3);
        let retry = over_budget_retry_after(&out);
        assert!(
            (1..=1201).contains(&retry),
            "one request comes back every 20 min: {retry}"
        );
        assert!(out.contains("\"rule\":\"budgeted\""), "{out}");
    }
    assert_eq!(
        s.api.requests().len(),
        before + 3,
        "refused requests never reached the upstream"
    );
    // The rule on port 80 has no budget and is not counted against this one.
    let (status, out) = call(80);
    assert_eq!(status, "200", "{out}");
    let refusals = tollgate_tests::wait_for(10, "both budget refusals", || {
        let r: Vec<_> = env
            .records()
            .into_iter()
            .filter(|r| r["reason"] == "budget_exhausted")
            .collect();
        (r.len() == 2).then_some(r)
    });
    for r in &refusals {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["rule"], "budgeted", "{r}");
        assert_eq!(r["http"]["status"], 429, "{r}");
        assert_eq!(
            r["workload"]["cgroup"],
            format!("{}/agent.service", env.root_rel())
        );
    }

    // `scope: workload`: the second agent's two requests are its own, not what the first
    // one left of a shared two.
    let statuses = |cgroup: &std::path::Path| -> Vec<String> {
        (0..3).map(|_| call_from(cgroup, 8082).0).collect()
    };
    assert_eq!(
        statuses(&team[0]),
        ["200", "200", "429"],
        "a: its two, then refused"
    );
    assert_eq!(
        statuses(&team[1]),
        ["200", "200", "429"],
        "b: two of its own"
    );
    let (status, out) = call_from(&team[2], 8082);
    assert_eq!(
        status, "429",
        "a cgroup inside a's spends a's budget: {out}"
    );
    let each = tollgate_tests::wait_for(10, "the team's records", || {
        let r: Vec<_> = env
            .records()
            .into_iter()
            .filter(|r| r["rule"] == "each")
            .collect();
        (r.len() == 7).then_some(r)
    });
    for (who, cgroup) in ["a", "b"].iter().zip(&team[..2]) {
        let path = format!("{}/team/{who}.service", env.root_rel());
        let theirs: Vec<_> = each
            .iter()
            .filter(|r| r["workload"]["cgroup"] == path.as_str())
            .map(|r| {
                (
                    r["decision"].as_str().unwrap_or("").to_owned(),
                    r["reason"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert_eq!(theirs.len(), 3, "{cgroup:?}: {each:?}");
        assert_eq!(
            theirs[2],
            ("deny".to_owned(), "budget_exhausted".to_owned()),
            "{who}"
        );
    }
    // `tollgate budgets` shows what is left of each: the rule's spent 3 and each agent's 2.
    let out = env.tollgate(&["budgets"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let left: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let of = |suffix: &str| {
        left.iter()
            .find(|b| b["budget"].as_str().is_some_and(|k| k.ends_with(suffix)))
            .unwrap_or_else(|| panic!("{suffix} in {text}"))
    };
    let rule = of("#budgeted#api.openai.com:8080");
    assert_eq!(
        (rule["counts"].as_str(), rule["of"].as_f64()),
        (Some("requests"), Some(3.0))
    );
    assert!(rule["left"].as_f64().is_some_and(|l| l < 1.0), "{rule}");
    for who in ["a", "b"] {
        let b = of(&format!("#cgroup:{}/team/{who}.service", env.root_rel()));
        assert_eq!(b["of"].as_f64(), Some(2.0), "{b}");
        assert!(b["left"].as_f64().is_some_and(|l| l < 1.0), "{b}");
    }

    // Tokens: 100 an hour (one back every 36 s). Each answer counts the request's bytes in
    // and 7 out (67 here), charged when it ends; at admission a request reserves a token per
    // 4 bytes it sends (15 here) plus the most output it asks for, or the rule's
    // `reserve_output` (10) where it asks none, and is let in only while that many are left.
    let body = r#"{"model":"gpt-4o-mini","input":"count my tokens, please!!!"}"#;
    assert_eq!((body.len() + 7, body.len().div_ceil(4)), (67, 15));
    // Asks for up to 40 output tokens: 21 + 40 = 61 to reserve.
    let greedy =
        r#"{"model":"gpt-4o-mini","input":"count my tokens, please!!!","max_output_tokens":40}"#;
    assert_eq!(greedy.len().div_ceil(4), 21);
    let ask = |body: &str| {
        let (out, err) = curl(
            &s.agent,
            &[
                "-i",
                "--resolve",
                "api.openai.com:8081:127.0.0.9",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                "http://api.openai.com:8081/v1/responses",
            ],
        );
        env.keep_client_output(out.as_bytes());
        let status = out
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("{out} {err}"));
        (status.to_owned(), out)
    };
    let answered = |n: usize| {
        // Its record is written after the charge: the next request sees it.
        tollgate_tests::wait_for(10, "the answer's record", || {
            (env.records()
                .iter()
                .filter(|r| r["rule"] == "tokens" && r["llm"]["tokens_out"] == 7)
                .count()
                == n)
                .then_some(())
        });
    };
    let (status, out) = ask(body);
    assert_eq!(status, "200", "answer 1: {out}");
    answered(1);
    // 100 - 25 + 25 - 67 = 33 left: the greedy request waits for the 28 more it needs
    // (1,008 s); the plain one (25) fits.
    let (status, out) = ask(greedy);
    assert_eq!(status, "429", "{out}");
    let retry = over_budget_retry_after(&out);
    assert!(
        (998..=1009).contains(&retry),
        "28 tokens at 100 an hour: {retry}"
    );
    let (status, out) = ask(body);
    assert_eq!(status, "200", "answer 2: {out}");
    answered(2);
    // It used 67 of the 33: in debt by 34, the next waits until 25 are back (59 tokens: 2,124 s).
    let (status, out) = ask(body);
    assert_eq!(status, "429", "{out}");
    let retry = over_budget_retry_after(&out);
    assert!(
        (2114..=2125).contains(&retry),
        "59 tokens at 100 an hour: {retry}"
    );
}

/// The `Retry-After` seconds of a 429 `budget_exhausted` response `out` (curl -i).
fn over_budget_retry_after(out: &str) -> u64 {
    assert!(out.contains("\"reason\":\"budget_exhausted\""), "{out}");
    out.to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After: {out}"))
}

/// Holds `cap` connections to the API open, asks on one more; on a line from stdin closes
/// one of them and asks again. Prints each answer's status line (or how it failed).
const HOLD_CONNECTIONS: &str = r#"
import json, socket, sys, time
cap = int(sys.argv[1])
REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
       b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
def ask():
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(('127.0.0.9', 80))
        s.sendall(REQ)
        data = b''
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        return data.split(b'\r\n', 1)[0].decode() or 'closed'
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
held = [socket.create_connection(('127.0.0.9', 80)) for _ in range(cap)]
time.sleep(0.5)
print(json.dumps({"over": ask()}), flush=True)
sys.stdin.readline()
held.pop().close()
time.sleep(0.5)
print(json.dumps({"after": ask()}), flush=True)
for s in held:
    s.close()
"#;

/// THREATS 25, connections: past `max_connections_per_workload`, a workload's connections are
/// reset and audited `connection_limit`, while another workload is still served, and a closed
/// connection frees its slot.
#[test]
fn a_workload_past_its_most_connections_is_refused_and_others_are_served() {
    // The held connections send nothing: a long header timeout keeps them open however slow
    // the machine.
    let s = setup_with(
        "conncap",
        "max_connections_per_workload: 3\nclient_header_timeout_ms: 120000\n",
    );
    let env = &s.env;
    std::fs::write(
        env.policies.join("other.yaml"),
        POLICY
            .replace("ROOT", &env.root_rel())
            .replace("/agent.service", "/other.service")
            .replace("{ name: agent }", "{ name: other }"),
    )
    .expect("policy");
    let _d = env.start();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", HOLD_CONNECTIONS, "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let mut child = cmd.spawn().expect("python3");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = child.stderr.take().expect("stderr");
    let mut next = || {
        let Some(Ok(line)) = lines.next() else {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            panic!("python3 ended early: {err}");
        };
        env.keep_client_output(line.as_bytes());
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let over = next();
    assert!(
        !over["over"]
            .as_str()
            .unwrap_or("HTTP/")
            .starts_with("HTTP/"),
        "the fourth connection got no answer: {over}"
    );
    let rec = env.wait_record("the fourth connection refused", |r| {
        r["reason"] == "connection_limit"
    });
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert_eq!(rec["policy"], "agent", "{rec}");
    assert!(
        rec["workload"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("/agent.service")),
        "{rec}"
    );
    // `tollgate connections` shows the workload holding its most.
    let out = env.tollgate(&["connections"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>(),
        [serde_json::json!({ "workload": "unit:agent.service", "open": 3, "of": 3 })],
        "{text}"
    );
    // Another workload is served while the first holds its most.
    let (out, err) = chat(&s.other);
    env.keep_client_output(out.as_bytes());
    assert!(out.ends_with("200"), "other.service served: {out} {err}");
    // One held connection closes: its slot is free again.
    use std::io::Write as _;
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("signal");
    let after = next();
    assert!(
        after["after"]
            .as_str()
            .is_some_and(|l| l.starts_with("HTTP/1.1 200")),
        "a slot freed by a close is used: {after}"
    );
    let status = child.wait().expect("python3");
    assert!(status.success(), "python3: {status}");
    assert_eq!(
        env.records()
            .iter()
            .filter(|r| r["reason"] == "connection_limit")
            .count(),
        1,
        "one refusal, one record"
    );
}

/// HTTP/2 with prior knowledge, by hand: N requests for PATH opened at once on one
/// connection. Prints each stream's body in order, and the codes of any stream resets.
const H2_PARALLEL: &str = r#"
import json, socket, struct, sys
n = int(sys.argv[1]); path = sys.argv[2].encode()
def frame(kind, flags, stream, payload):
    return struct.pack('>I', len(payload))[1:] + bytes([kind, flags]) + struct.pack('>I', stream) + payload
def lit(index, value):
    return bytes([index]) + bytes([len(value)]) + value
block = b'\x82' + b'\x86' + lit(4, path) + lit(1, b'api.openai.com')
s = socket.create_connection(('127.0.0.9', 80), timeout=10)
out = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + frame(4, 0, 0, b'')
streams = [1 + 2 * i for i in range(n)]
for sid in streams:
    out += frame(1, 5, sid, block)
s.sendall(out)
bodies = {sid: b'' for sid in streams}
done = set(); resets = {}
buf = b''
while len(done) < n:
    while len(buf) >= 9:
        ln = int.from_bytes(buf[:3], 'big')
        if len(buf) < 9 + ln:
            break
        kind, flags, sid, payload = buf[3], buf[4], int.from_bytes(buf[5:9], 'big') & 0x7fffffff, buf[9:9 + ln]
        buf = buf[9 + ln:]
        if kind == 4 and not flags & 1:
            s.sendall(frame(4, 1, 0, b''))
        elif kind == 6 and not flags & 1:
            s.sendall(frame(6, 1, 0, payload))
        elif kind == 0 and sid in bodies:
            bodies[sid] += payload
            if ln:
                s.sendall(frame(8, 0, 0, struct.pack('>I', ln)) + frame(8, 0, sid, struct.pack('>I', ln)))
            if flags & 1: done.add(sid)
        elif kind == 1 and flags & 1 and sid in bodies:
            done.add(sid)
        elif kind == 3:
            resets[sid] = int.from_bytes(payload[:4], 'big'); done.add(sid)
        elif kind == 7:
            print(json.dumps({'goaway': int.from_bytes(payload[4:8], 'big')})); sys.exit(0)
    if len(done) == n:
        break
    data = s.recv(65536)
    if not data:
        break
    buf += data
print(json.dumps({'bodies': [bodies[sid].decode(errors='replace') for sid in streams], 'resets': resets}))
"#;

/// Sends `streams` GETs of `path` at once on one HTTP/2 connection from the agent's cgroup
/// through [`H2_PARALLEL`]; what it printed (each stream's body, the resets). Kept for the
/// secret scan.
fn h2_parallel(s: &Setup, streams: usize, path: &str) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", H2_PARALLEL, &streams.to_string(), path])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let out = cmd.output().expect("python3");
    s.env.keep_client_output(&out.stdout);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// HTTP/2 requests in flight count against `max_connections_per_workload` too (each holds an
/// upstream connection of its own): with a cap of 3, one connection carrying three slow
/// requests at once has two served and the third refused 503 `connection_limit`, audited,
/// and nothing of it reaches the API.
#[test]
fn http2_requests_in_flight_count_against_the_connection_cap() {
    let s = setup_with("h2cap", "max_connections_per_workload: 3\n");
    let env = &s.env;
    let _d = env.start();
    let got = h2_parallel(&s, 3, "/v1/models/slow-1500");
    let bodies: Vec<&str> = got["bodies"]
        .as_array()
        .unwrap_or_else(|| panic!("{got}"))
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let served = bodies.iter().filter(|b| b.contains("auth_sha256")).count();
    let refused = bodies
        .iter()
        .filter(|b| b.contains("connection_limit"))
        .count();
    assert_eq!((served, refused), (2, 1), "{got}");
    let rec = env.wait_record("the third stream refused", |r| {
        r["reason"] == "connection_limit" && r["layer"] == "request"
    });
    assert_eq!(rec["http"]["status"], 503, "{rec}");
    assert_eq!(rec["http"]["method"], "GET", "{rec}");
    assert_eq!(
        s.api
            .requests()
            .iter()
            .filter(|h| h.contains("slow-1500"))
            .count(),
        2,
        "the refused stream went nowhere"
    );
}

/// THREATS 25: slow request heads are cut when the client header timeout fires, each audited;
/// the gateway keeps serving meanwhile and its memory stays bounded.
#[test]
fn slowloris_connections_are_cut_and_memory_stays_bounded() {
    let s = setup_with("slowloris", "client_header_timeout_ms: 1000\n");
    let env = &s.env;
    let d = env.start();
    let rss = |pid: i32| tollgate_tests::peers::status_kib(pid, "VmRSS:");
    let rss_before = rss(d.pid());
    let n = 300;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SLOWLORIS, &n.to_string(), "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let child = cmd.spawn().expect("python3");
    // While the slow heads trickle in, a normal request is served.
    std::thread::sleep(Duration::from_millis(400));
    let (out, err) = chat(&s.agent);
    env.keep_client_output(out.as_bytes());
    assert!(
        out.ends_with("200"),
        "served during the attack: {out} {err}"
    );
    let rss_during = rss(d.pid());
    let out = child.wait_with_output().expect("python3");
    env.keep_client_output(&out.stdout);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        v["first"]
            .as_str()
            .unwrap_or("")
            .starts_with("HTTP/1.1 200"),
        "{v}"
    );
    let slow: Vec<f64> = v["slow"]
        .as_array()
        .expect("slow")
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert_eq!(slow.len(), n);
    let latest = slow.iter().copied().fold(0.0, f64::max);
    assert!(
        slow.iter().all(|t| *t >= 0.9),
        "none cut before the timeout: {slow:?}"
    );
    assert!(
        slow.iter().all(|t| *t > 0.0 && *t < 3.0),
        "every slow head cut within 3 s: {slow:?}"
    );
    println!(
        "25: {n} slow heads cut after {:.2}-{latest:.2} s; idle kept-alive connection closed at {} s; RSS {rss_before} kB before, {rss_during} kB during",
        slow.iter().copied().fold(f64::MAX, f64::min),
        v["idle"]
    );
    // Each cut is audited, naming the workload: past the audit's share a second, inside a
    // folded record's count.
    let workload = format!("{}/agent.service", env.root_rel());
    let cut = wait_decisions(env, n, |r| {
        r["reason"] == "no_request_in_time" && r["workload"]["cgroup"] == workload.as_str()
    });
    assert_eq!(cut, n, "each cut audited once");
    assert!(
        rss_during < rss_before + 64 * 1024,
        "memory bounded: {rss_before} kB → {rss_during} kB with {n} slow connections"
    );
}

/// A request sent a while after the connect is served like any other: the gateway waits for
/// the first bytes (without a head's buffer), then reads the head.
#[test]
fn a_request_sent_a_while_after_the_connect_is_served() {
    let s = setup("late-request");
    let env = &s.env;
    let _d = env.start();
    // Connects, says nothing for 300 ms, then sends the request.
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let got = raw_exchange(&s, request, Some("0.3"));
    assert!(
        got["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("HTTP/1.1 200"),
        "{got}"
    );
    let workload = format!("{}/agent.service", env.root_rel());
    let served = wait_count(env, 1, |r| {
        r["layer"] == "request"
            && r["decision"] == "allow"
            && r["http"]["status"] == 200
            && r["workload"]["cgroup"] == workload.as_str()
    });
    assert_eq!(served, 1, "one record of the served request");
}

/// A head hyper cannot parse, after a request served on the same kept-alive connection, ends
/// the connection and is audited once, naming the workload (invariants 4 and 8): every decision
/// has its record, not only one on a connection's first request.
#[test]
fn a_later_unparsable_head_is_audited_once() {
    let s = setup("later-unparsable");
    let _d = s.env.start();
    let second = "GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nBad@Name: x\r\n\r\n";
    // Anything written late would have come with the connection's end, already seen.
    assert_eq!(
        after_a_served_request(&s, second, "request_unparsable"),
        (1, 1),
        "one record each"
    );
}

/// A later head the client begins and never finishes, after a request served on the same
/// kept-alive connection, is audited once when the header timeout cuts it: a request begun
/// leaves a record, as an idle connection between requests does not.
#[test]
fn a_later_head_left_unfinished_is_audited_when_cut() {
    let s = setup_with("later-unfinished", "client_header_timeout_ms: 1000\n");
    let _d = s.env.start();
    let unfinished = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.op";
    assert_eq!(
        after_a_served_request(&s, unfinished, "no_request_in_time"),
        (1, 1),
        "one record each"
    );
}

/// Sends a chat request and then `later` on one connection from the agent; checks the first
/// was served, and returns how many records the agent has of the served request and with
/// `reason`.
fn after_a_served_request(s: &Setup, later: &str, reason: &str) -> (usize, usize) {
    let first =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}";
    let got = raw_exchange(s, &format!("{first}{later}"), None);
    assert!(
        got["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("HTTP/1.1 200"),
        "the first request is served: {got}"
    );
    let ours = |r: &serde_json::Value| r["workload"]["cgroup"] == cgroup_of(&s.env, &s.agent);
    let audited = wait_count(&s.env, 1, |r| ours(r) && r["reason"] == reason);
    let served = wait_count(&s.env, 1, |r| {
        ours(r) && r["layer"] == "request" && r["decision"] == "allow"
    });
    (served, audited)
}

/// Sends `raw` on one connection from the agent's cgroup through [`RAW_CLIENT`] (waiting
/// `delay` seconds after the connect, if given) and returns what it printed: the status line
/// and the response. What came back is kept for the secret scan.
fn raw_exchange(s: &Setup, raw: &str, delay: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", RAW_CLIENT])
        .args(delay)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_before_exec(&mut cmd, &s.agent);
    let mut child = cmd.spawn().expect("python3");
    let input = serde_json::json!([raw]).to_string();
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("send the request");
    let out = child.wait_with_output().expect("python3");
    s.env.keep_client_output(&out.stdout);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until the records matching `pred` account for at least `n` decisions (a folded
/// record for its `count`); returns how many they do.
fn wait_decisions(env: &TestEnv, n: usize, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while decisions(env, &pred) < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A record counted twice would be written by the end of the writer's second.
    std::thread::sleep(Duration::from_millis(1500));
    decisions(env, &pred)
}

/// How many decisions the records matching `pred` account for now.
fn decisions(env: &TestEnv, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    let c: u64 = env
        .records()
        .iter()
        .filter(|r| pred(r))
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    usize::try_from(c).unwrap_or(usize::MAX)
}

/// Waits until at least `n` records match `pred`; returns how many do.
fn wait_count(env: &TestEnv, n: usize, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = env.records().iter().filter(|r| pred(r)).count();
        if c >= n || std::time::Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The upstream's time to first byte has its own limit, separate from the client's header
/// timeout: an answer slower than the client's limit still arrives; one slower than the
/// upstream's gets a 504 at that limit, audited, and the client is answered.
#[test]
fn a_slow_upstream_is_waited_for_up_to_its_own_header_timeout() {
    let s = setup_with(
        "slow-upstream",
        "client_header_timeout_ms: 300\nupstream_header_timeout_ms: 1500\n",
    );
    let env = &s.env;
    let _d = env.start();
    let get = |path: &str| {
        let started = std::time::Instant::now();
        let (out, _) = curl(
            &s.agent,
            &[
                "-w",
                "\n%{http_code}",
                &format!("http://api.openai.com{path}"),
            ],
        );
        (out, started.elapsed())
    };
    // Slower than the client's header timeout, within the upstream's: answered.
    let (out, took) = get("/v1/models/slow-700");
    assert!(out.ends_with("200") && out.contains("slow-700"), "{out}");
    assert!(took >= Duration::from_millis(700), "{took:?}");
    // Slower than the upstream's: 504 when that limit runs out, not when the upstream answers.
    let (late, took) = get("/v1/models/slow-4000");
    std::fs::write(env.dir.join("client-output.txt"), format!("{out}\n{late}"))
        .expect("client output");
    assert!(
        late.ends_with("504") && late.contains("upstream_timeout"),
        "{late}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "answered after {took:?}"
    );
    env.wait_record("the upstream timeout", |r| {
        r["reason"] == "upstream_timeout"
            && r["decision"] == "error"
            && r["http"]["status"] == 504
            && r["http"]["path"] == "/v1/models/slow-4000"
    });
}

/// A request body far larger than any buffer streams through to the upstream whole: the
/// client connection and the upstream connection share one task, each feeding the other.
#[test]
fn a_large_upload_streams_through_whole() {
    let s = setup("upload");
    let env = &s.env;
    let _d = env.start();
    let body = env.dir.join("upload.json");
    let size = 4 * 1024 * 1024 + 17;
    std::fs::write(&body, vec![b'x'; size]).expect("body");
    let (out, err) = curl(
        &s.agent,
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", body.display()),
            "-w",
            "\n%{http_code}",
            "http://api.openai.com/v1/chat/completions",
        ],
    );
    env.keep_client_output(out.as_bytes());
    assert!(
        out.ends_with("200") && out.contains(&format!("\"body_len\":{size}")),
        "{out} {err}"
    );
    let rec = env.wait_record("the upload's record", |r| {
        r["http"]["path"] == "/v1/chat/completions" && r["decision"] == "allow"
    });
    assert_eq!(rec["bytes_up"], size, "{rec}");
}

/// THREATS 19: a name that resolves to an internal address (here `localhost`, through the
/// system resolver, not the test override) is refused at dial time unless the rule says
/// `allow_private`; the refusal is a 403 with its own reason, and nothing reaches the address.
#[test]
fn internal_addresses_are_dialed_only_where_a_rule_allows_them() {
    let mut s = setup("internal");
    let internal = s.env.workload("internal.service");
    let mock = tollgate_tests::Mock::start("127.0.0.1:0");
    for (name, cgroup, allow) in [
        ("internal", "internal.service", false),
        ("other", "other.service", true),
    ] {
        std::fs::write(
            s.env.policies.join(format!("{name}.yaml")),
            format!(
                "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: {name} }}\nspec:\n  workload: {{ cgroup: {root}/{cgroup} }}\n  egress:\n    - name: local-service\n      match: {{ host: localhost, port: 80 }}\n      upstream: {{ port: {port} }}\n      tls: none\n      allow_private: {allow}\n",
                root = s.env.root_rel(),
                port = mock.addr.port(),
            ),
        )
        .expect("policy");
    }
    let env = &s.env;
    let _d = env.start();
    let get = |cgroup: &std::path::Path| {
        let out = run_in(
            cgroup,
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "--resolve",
                "localhost:80:127.0.0.9",
                "-w",
                "\n%{http_code}",
                "http://localhost/status",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let refused = get(&internal);
    std::fs::write(env.dir.join("client-output.txt"), &refused).expect("client output");
    assert!(
        refused.ends_with("403") && refused.contains("upstream_internal_address"),
        "{refused}"
    );
    assert!(
        mock.peers().is_empty(),
        "nothing reached the internal address"
    );
    env.wait_record("the internal dial refused", |r| {
        r["reason"] == "upstream_internal_address"
            && r["decision"] == "deny"
            && r["workload"]["cgroup"]
                .as_str()
                .is_some_and(|c| c.ends_with("/internal.service"))
    });
    // Positive control: the same name, where the rule allows internal addresses.
    let allowed = get(&s.other);
    assert!(
        allowed.ends_with("200") && allowed.contains("mock "),
        "{allowed}"
    );
    assert_eq!(
        mock.peers().len(),
        1,
        "the allowed dial reached the service"
    );
}

/// THREATS 25, the other half: an event stream that never ends, read slowly. The gateway
/// forwards it with backpressure (its memory stays flat while the upstream is held back), and
/// when the client goes away the upstream stream is dropped too.
#[test]
fn an_endless_stream_to_a_slow_reader_keeps_memory_bounded() {
    let s = setup("endless");
    let env = &s.env;
    let d = env.start();
    let rss = || tollgate_tests::peers::status_kib(d.pid(), "VmRSS:");
    let before = rss();
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--resolve",
        "api.openai.com:80:127.0.0.9",
        "--limit-rate",
        "50k",
        "--max-time",
        "4",
        "-o",
        // Kept for the secret scan.
        env.dir
            .join("client-output-stream.txt")
            .to_str()
            .expect("path"),
        "-w",
        "%{size_download}",
        "http://api.openai.com/v1/models/endless",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    join_before_exec(&mut cmd, &s.agent);
    let child = cmd.spawn().expect("curl");
    let mut peak = before;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss());
    }
    let written = s.api.endless_bytes();
    let out = child.wait_with_output().expect("curl");
    let read: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    println!(
        "25: endless stream read at 50 KiB/s: {read} bytes read, {written} written upstream after 3 s; gateway RSS {before} kB → peak {peak} kB"
    );
    assert!(read > 0, "the stream flowed");
    assert!(
        peak < before + 16 * 1024,
        "memory bounded: {before} kB → {peak} kB"
    );
    // Held back: the upstream wrote no more than the reader took plus what the socket
    // buffers on both hops hold.
    assert!(
        written < read + 32 * 1024 * 1024,
        "{written} written, {read} read"
    );
    // The client is gone: the upstream stream stops.
    std::thread::sleep(Duration::from_millis(500));
    let stopped = s.api.endless_bytes();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        s.api.endless_bytes(),
        stopped,
        "the upstream stream was dropped"
    );
    env.wait_record("the stream's record", |r| {
        r["http"]["path"] == "/v1/models/endless"
    });
}

/// THREATS 25, the audit volume: a workload refused in a loop on one kept-alive connection
/// gets `audit_denials_per_second` of its denials written whole each second and the rest
/// counted into one record per second, so it cannot fill the audit volume; every denial is
/// still accounted for, and the folded record lists what they were for. Another workload under
/// the same policy and rule, refused the same way at the same time, has its own share.
#[test]
fn a_denial_flood_is_folded_into_counted_records_and_every_denial_is_counted() {
    const N: usize = 300;
    const SHARE: usize = 5;
    let s = setup_with("fold", &format!("audit_denials_per_second: {SHARE}\n"));
    let env = &s.env;
    // One policy for both workloads: only the workload tells their denials apart.
    std::fs::write(
        env.policies.join("agent.yaml"),
        POLICY.replace("ROOT/agent.service", &env.root_rel()),
    )
    .expect("policy");
    let _d = env.start();
    let of = |cgroup: &std::path::Path| {
        let cgroup = cgroup_of(env, cgroup);
        move |r: &serde_json::Value| {
            r["http"]["path"] == "/v1/files" && r["workload"]["cgroup"] == cgroup.as_str()
        }
    };
    let (flooded, others) = (of(&s.agent), of(&s.other));
    // One curl, N requests on one connection, each answered 403; meanwhile, in the same
    // second, the other workload asks three times.
    let mut args = vec!["-w", "\n%{http_code}\n"];
    args.extend(std::iter::repeat_n("http://api.openai.com/v1/files", N));
    let other = s.other.clone();
    let meanwhile = std::thread::spawn(move || {
        // Once the flood has spent its share (it runs at about 2,000 a second).
        std::thread::sleep(Duration::from_millis(100));
        let url = "http://api.openai.com/v1/files";
        curl(&other, &["-w", "\n%{http_code}\n", url, url, url])
    });
    let started = std::time::Instant::now();
    let (out, err) = curl(&s.agent, &args);
    let took = started.elapsed();
    env.keep_client_output(out.as_bytes());
    let refused = out.lines().filter(|l| *l == "403").count();
    assert_eq!(refused, N, "every request refused: {err}");
    let (other_out, _) = meanwhile.join().expect("the other workload");
    env.keep_client_output(other_out.as_bytes());
    assert_eq!(
        other_out.lines().filter(|l| *l == "403").count(),
        3,
        "{other_out}"
    );
    // The last second's count is written when it ends; anything counted twice would come
    // by then too.
    assert_eq!(
        wait_decisions(env, N, &flooded),
        N,
        "each denial counted once"
    );
    let recs = env.records();
    let (whole, folded): (Vec<_>, Vec<_>) = recs
        .iter()
        .filter(|r| flooded(r))
        .partition(|r| r.get("count").is_none());
    // At most a share per second the flood spanned (the seconds are the writer's, begun at a
    // denial, so a flood of `took` touches at most took + 2 of them).
    let most = SHARE * (took.as_secs() as usize + 2);
    assert!(
        whole.len() <= most && whole.len() < N / 2,
        "{} written whole over {took:?}",
        whole.len()
    );
    assert!(!folded.is_empty());
    for r in &folded {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["http"]["status"], 403, "{r}");
        let (since, ts) = (r["folded"]["since"].as_str(), r["ts"].as_str());
        assert!(since.is_some() && since <= ts, "{r}");
        let targets = &r["folded"]["targets"];
        assert_eq!(targets[0]["dst"], "GET api.openai.com/v1/files", "{r}");
        let exe = targets[0]["exe"].as_str().unwrap_or("");
        assert!(exe.ends_with("/curl"), "{r}");
        assert_eq!(targets[0]["count"], r["count"], "{r}");
    }
    let theirs: Vec<_> = recs.iter().filter(|r| others(r)).collect();
    assert_eq!(theirs.len(), 3, "{theirs:?}");
    assert!(
        theirs
            .iter()
            .all(|r| r.get("count").is_none() && r["policy"] == "agent"),
        "the other workload's own share, written whole: {theirs:?}"
    );
    eprintln!(
        "{N} denials over {took:?}: {} written whole, {} counted records",
        whole.len(),
        folded.len()
    );
}

/// `cgroup`'s path as the audit record names it.
fn cgroup_of(env: &TestEnv, cgroup: &std::path::Path) -> String {
    format!(
        "{}/{}",
        env.root_rel(),
        cgroup.file_name().and_then(|n| n.to_str()).expect("name")
    )
}

/// An HTTP/2 connection whose only stream was refused for the cap has had its decision
/// audited (the stream's 503): its end writes no `closed_before_request` record besides.
#[test]
fn an_http2_connection_whose_only_stream_was_refused_is_audited_once() {
    // The connection takes the one slot; its stream finds none.
    let s = setup_with("h2cap1", "max_connections_per_workload: 1\n");
    let env = &s.env;
    let _d = env.start();
    let got = h2_parallel(&s, 1, "/v1/models/gpt-4o");
    assert!(
        got["bodies"][0]
            .as_str()
            .is_some_and(|b| b.contains("connection_limit")),
        "{got}"
    );
    let mine = |r: &serde_json::Value| r["workload"]["cgroup"] == cgroup_of(env, &s.agent);
    env.wait_record("the refused stream", |r| {
        mine(r) && r["reason"] == "connection_limit"
    });
    // The client has closed: give the connection's end time to be recorded, were it to be.
    std::thread::sleep(Duration::from_millis(500));
    let reasons: Vec<String> = env
        .records()
        .iter()
        .filter(|r| mine(r))
        .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(reasons, ["connection_limit"], "one record, the stream's");
}
