//! A stand-in for the GitHub Actions runner (`run.sh --jitconfig …`) in kiln's tests: it decodes a JIT config of the test GitHub (`tests/support/github.rs`), connects to its broker, takes one job, "runs" it as long as the server says, reports it done and exits.
//!
//! The JIT config comes from `--jitconfig <encoded>` or, as the real runner reads its inputs,
//! from `ACTIONS_RUNNER_INPUT_JITCONFIG` (the flag wins). Like the real runner it waits for a
//! job indefinitely, retrying a server it cannot reach, but gives up after 30 s without any
//! answer so that no stand-in outlives its test.
//!
//! Exit codes: 0 it ran its job; 1 the job ended without it (lost); 2 usage error or an
//! undecodable JIT config; 3 the server refused the config (bad, expired, already used) or
//! closed the session; 4 the registration was deleted; 5 the server could not be reached for
//! 30 s; 143 SIGTERM (a job it was running is reported failed first).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

/// How long a long poll asks the server to hold.
const POLL: Duration = Duration::from_secs(20);
/// How long the server may stay unreachable before the stand-in gives up.
const UNREACHABLE: Duration = Duration::from_secs(30);

const ENV_JITCONFIG: &str = "ACTIONS_RUNNER_INPUT_JITCONFIG";

/// An exit: the code and what to say on stderr.
struct Exit(i32, String);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let code = match run().await {
        Ok(()) => 0,
        Err(Exit(code, message)) => {
            eprintln!("{message}");
            code
        }
    };
    std::process::exit(code);
}

/// What the stand-in needs from a JIT config.
struct Config {
    server: String,
    runner_id: u64,
    name: String,
    secret: String,
}

fn jitconfig() -> Result<String, Exit> {
    let mut args = std::env::args().skip(1);
    let mut from_flag = None;
    while let Some(arg) = args.next() {
        if arg == "--jitconfig" {
            from_flag = Some(
                args.next()
                    .ok_or_else(|| Exit(2, "--jitconfig needs a value".to_owned()))?,
            );
        } else if let Some(value) = arg.strip_prefix("--jitconfig=") {
            from_flag = Some(value.to_owned());
        } else {
            return Err(Exit(
                2,
                format!(
                    "Unrecognized command-line input arguments: '{arg}'. Usage: fake-actions-runner --jitconfig <encoded_jit_config>"
                ),
            ));
        }
    }
    // The real runner takes ACTIONS_RUNNER_INPUT_<ARG> case-insensitively, trimmed, ignoring
    // empty values, and a command-line argument over it.
    let from_env = std::env::vars()
        .find(|(k, v)| k.eq_ignore_ascii_case(ENV_JITCONFIG) && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_owned());
    from_flag
        .filter(|v| !v.trim().is_empty())
        .or(from_env)
        .ok_or_else(|| {
            Exit(
                2,
                format!("no JIT config: pass --jitconfig <encoded> or set {ENV_JITCONFIG}"),
            )
        })
}

fn decode(encoded: &str) -> Result<Config, String> {
    fn file(files: &Value, name: &str) -> Result<Value, String> {
        let text = files[name]
            .as_str()
            .ok_or_else(|| format!("no {name} in it"))?;
        let raw = STANDARD
            .decode(text)
            .map_err(|e| format!("{name} is not base64: {e}"))?;
        serde_json::from_slice(&raw).map_err(|e| format!("{name} is not JSON: {e}"))
    }
    let raw = STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    let files: Value = serde_json::from_slice(&raw).map_err(|e| format!("not JSON: {e}"))?;
    let runner = file(&files, ".runner")?;
    let credentials = file(&files, ".credentials")?;
    if credentials["scheme"] != "KilnTestRunner" {
        return Err("its credentials are not the test GitHub's".to_owned());
    }
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no {what} in it"))
    };
    Ok(Config {
        server: text(&runner["serverUrl"], "serverUrl")?,
        runner_id: runner["agentId"]
            .as_u64()
            .ok_or_else(|| "no agentId in it".to_owned())?,
        name: text(&runner["agentName"], "agentName")?,
        secret: text(&credentials["data"]["secret"], "secret")?,
    })
}

/// One broker answer: status and JSON body (`Null` when empty).
type Answer = (u16, Value);

struct Broker {
    client: reqwest::Client,
    server: String,
    /// Since when the server has not answered, if it has not.
    unreachable_since: Option<Instant>,
}

impl Broker {
    /// Sends until the server answers, waiting 500 ms between tries; gives up (exit 5) after
    /// [`UNREACHABLE`] without an answer.
    async fn send(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, Exit> {
        loop {
            let mut request = self
                .client
                .request(method.clone(), format!("{}{path}", self.server))
                .timeout(POLL + Duration::from_secs(10));
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    self.unreachable_since = None;
                    let status = response.status().as_u16();
                    let body = response.bytes().await.unwrap_or_default();
                    return Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                }
                Err(e) => {
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE {
                        return Err(Exit(
                            5,
                            format!("cannot reach the server at {}: {e}", self.server),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The broker's refusal as an exit.
fn refused((status, body): Answer, what: &str) -> Exit {
    let message = body["message"]
        .as_str()
        .unwrap_or("no reason given")
        .to_owned();
    match status {
        404 if message.contains("deleted") => Exit(4, message),
        401 | 409 | 410 => Exit(3, format!("{what} refused ({status}): {message}")),
        _ => Exit(1, format!("{what} failed ({status}): {message}")),
    }
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{secs}")
}

/// Closes the session (best effort, two seconds at most): the runner goes offline.
async fn disconnect(broker: &mut Broker, session: &str) {
    let path = format!("/sessions/{session}");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        broker.send(reqwest::Method::DELETE, &path, None),
    )
    .await;
}

async fn run() -> Result<(), Exit> {
    let encoded = jitconfig()?;
    let config = decode(&encoded).map_err(|e| {
        Exit(
            2,
            format!("the JIT configuration could not be decoded: {e}"),
        )
    })?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Exit(1, format!("no SIGTERM handler: {e}")))?;
    let mut broker = Broker {
        client: reqwest::Client::new(),
        server: config.server.clone(),
        unreachable_since: None,
    };
    let credentials = json!({"runner_id": config.runner_id, "secret": config.secret});
    // A SIGTERM while connecting waits (briefly) for the answer, so that a session the server
    // opened is closed again and the runner goes offline.
    let mut terminated = false;
    let connected = {
        let connecting = broker.send(reqwest::Method::POST, "/sessions", Some(&credentials));
        tokio::pin!(connecting);
        tokio::select! {
            answer = &mut connecting => answer?,
            _ = term.recv() => {
                terminated = true;
                match tokio::time::timeout(Duration::from_secs(2), connecting).await {
                    Ok(answer) => answer?,
                    Err(_) => return Err(Exit(143, "Exiting: received SIGTERM while connecting".to_owned())),
                }
            }
        }
    };
    if connected.0 != 201 {
        return Err(refused(connected, "connecting"));
    }
    let session = connected.1["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if terminated {
        disconnect(&mut broker, &session).await;
        return Err(Exit(
            143,
            "Exiting: received SIGTERM while connecting".to_owned(),
        ));
    }
    println!("\u{221a} Connected to GitHub");
    println!(
        "Current runner version: '2.329.0-kiln-fake' (runner {} '{}')",
        config.runner_id, config.name
    );
    println!("{} Listening for Jobs", timestamp());

    let wait = POLL.as_millis();
    let job = loop {
        let path = format!("/sessions/{session}/message?wait_ms={wait}");
        let answer = tokio::select! {
            answer = broker.send(reqwest::Method::GET, &path, None) => answer?,
            _ = term.recv() => {
                disconnect(&mut broker, &session).await;
                return Err(Exit(143, "Exiting: received SIGTERM while listening for jobs".to_owned()));
            }
        };
        match answer.0 {
            200 => break answer.1,
            204 => continue,
            _ => return Err(refused(answer, "listening for jobs")),
        }
    };
    let job_id = job["job_id"].as_u64().unwrap_or_default();
    let name = job["name"].as_str().unwrap_or("job").to_owned();
    println!("{} Running job: {name}", timestamp());

    let complete = format!("/sessions/{session}/jobs/{job_id}/complete");
    let conclusion = loop {
        let path = format!("/sessions/{session}/jobs/{job_id}/outcome?wait_ms={wait}");
        let answer = tokio::select! {
            answer = broker.send(reqwest::Method::GET, &path, None) => answer?,
            _ = term.recv() => {
                let failed = json!({"conclusion": "failure"});
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    broker.send(reqwest::Method::POST, &complete, Some(&failed)),
                )
                .await;
                return Err(Exit(143, format!("Exiting: received SIGTERM while running job {name}; reported it failed")));
            }
        };
        match answer.0 {
            200 => {
                break answer.1["conclusion"]
                    .as_str()
                    .unwrap_or("success")
                    .to_owned();
            }
            204 => continue,
            _ => return Err(refused(answer, "running the job")),
        }
    };
    let done = broker
        .send(
            reqwest::Method::POST,
            &complete,
            Some(&json!({"conclusion": conclusion})),
        )
        .await?;
    if done.0 != 200 {
        return Err(refused(done, "reporting the job"));
    }
    let result = match conclusion.as_str() {
        "success" => "Succeeded",
        "cancelled" => "Canceled",
        _ => "Failed",
    };
    println!("{} Job {name} completed with result: {result}", timestamp());
    Ok(())
}
