//! Self-test of the test Jenkins in `support::jenkins`, driven with plain HTTP; doubles as its usage guide.

use crate::support;

use reqwest::header::{ACCEPT_LANGUAGE, AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Client, RequestBuilder, Response, StatusCode, redirect};
use serde_json::{Value, json};
use support::jenkins::{AuthKind, JenkinsServer, WhyLanguage};

const USER: &str = "kiln";
const TOKEN: &str = "11aa22bb33cc44dd55ee66ff77889900aa";
const PASSWORD: &str = "correct horse";

fn client() -> Client {
    Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

async fn server() -> (JenkinsServer, Client) {
    let server = JenkinsServer::start().await;
    server.add_user(USER, TOKEN, PASSWORD);
    (server, client())
}

fn get(client: &Client, server: &JenkinsServer, path: &str) -> RequestBuilder {
    client
        .get(format!("{}{path}", server.url()))
        .basic_auth(USER, Some(TOKEN))
        .header(ACCEPT_LANGUAGE, "en")
}

fn post(client: &Client, server: &JenkinsServer, path: &str) -> RequestBuilder {
    client
        .post(format!("{}{path}", server.url()))
        .basic_auth(USER, Some(TOKEN))
}

async fn json(response: Response) -> Value {
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn node_json(name: &str, label: &str) -> Value {
    json!({
        "name": name, "nodeDescription": "kiln one-shot agent", "numExecutors": 1,
        "remoteFS": "/home/jenkins/agent", "labelString": label, "mode": "EXCLUSIVE",
        "retentionStrategy": {"stapler-class": "hudson.slaves.RetentionStrategy$Always"},
        "nodeProperties": {"stapler-class-bag": "true"},
        "launcher": {"stapler-class": "hudson.slaves.JNLPLauncher", "webSocket": true,
            "workDirSettings": {"disabled": false, "workDirPath": "", "internalDir": "remoting",
                "failIfWorkDirIsMissing": false}},
    })
}

async fn create_node(
    client: &Client,
    server: &JenkinsServer,
    name: &str,
    kind: &str,
    json: &str,
) -> Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("name", name)
        .append_pair("type", kind)
        .append_pair("json", json)
        .finish();
    post(client, server, "/computer/doCreateItem")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Creates an EXCLUSIVE one-executor agent over REST and connects its agent with the secret
/// from its JNLP file.
async fn online_node(client: &Client, server: &JenkinsServer, name: &str, label: &str) {
    let created = create_node(
        client,
        server,
        name,
        "hudson.slaves.DumbSlave",
        &node_json(name, label).to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    let secret = jnlp_secret(client, server, name).await;
    assert!(server.connect_agent(name, &secret));
}

async fn jnlp_secret(client: &Client, server: &JenkinsServer, name: &str) -> String {
    let response = get(
        client,
        server,
        &format!("/computer/{name}/jenkins-agent.jnlp"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let xml = response.text().await.unwrap();
    let desc = xml.split("<application-desc").nth(1).unwrap();
    let first = desc.split("<argument>").nth(1).unwrap();
    first.split("</argument>").next().unwrap().to_owned()
}

/// `why` of every queued item, by id.
async fn whys(client: &Client, server: &JenkinsServer) -> Vec<(u64, String)> {
    let queue = json(
        get(client, server, "/queue/api/json?tree=items[id,why]")
            .send()
            .await
            .unwrap(),
    )
    .await;
    queue["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                i["why"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn why_of(client: &Client, server: &JenkinsServer, id: u64) -> String {
    let item = json(
        get(client, server, &format!("/queue/item/{id}/api/json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    item["why"].as_str().unwrap().to_owned()
}

async fn computer(client: &Client, server: &JenkinsServer, name: &str) -> Value {
    json(
        get(client, server, &format!("/computer/{name}/api/json?tree=offline,temporarilyOffline,idle,offlineCauseReason,executors[idle,currentExecutable[url]]"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn api_token_authenticates_without_crumb() {
    let (server, client) = server().await;
    let queue = json(
        get(&client, &server, "/queue/api/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        queue,
        json!({"_class": "hudson.model.Queue", "discoverableItems": [], "items": []})
    );
    let id = server.enqueue("build", "linux");
    let cancelled = post(&client, &server, &format!("/queue/cancelItem?id={id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::NO_CONTENT);
    assert!(server.queue_ids().is_empty());
    let left = json(
        get(&client, &server, &format!("/queue/item/{id}/api/json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(left["_class"], "hudson.model.Queue$LeftItem");
    assert_eq!(left["cancelled"], true);
    let again = post(&client, &server, &format!("/queue/cancelItem?id={id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    let requests = server.requests();
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, "/queue/api/json");
    assert_eq!(requests[0].user.as_deref(), Some(USER));
    assert_eq!(requests[0].auth, AuthKind::ApiToken);
    assert_eq!(requests[1].path, format!("/queue/cancelItem?id={id}"));
    assert_eq!(requests[1].status, 204);
}

#[tokio::test]
async fn bad_or_missing_credentials_are_refused() {
    let (server, client) = server().await;
    let url = format!("{}/queue/api/json", server.url());
    let wrong = client
        .get(&url)
        .basic_auth(USER, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong.headers()["www-authenticate"],
        "Basic realm=\"Jenkins\""
    );
    let unknown = client
        .get(&url)
        .basic_auth("mallory", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let garbage = client
        .get(&url)
        .header(AUTHORIZATION, "Basic !!!")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::FORBIDDEN);
    let anonymous_crumb = client
        .get(format!("{}/crumbIssuer/api/json", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous_crumb.status(), StatusCode::FORBIDDEN);
    let kinds: Vec<AuthKind> = server.requests().iter().map(|r| r.auth).collect();
    assert_eq!(
        kinds,
        [
            AuthKind::Invalid,
            AuthKind::Invalid,
            AuthKind::Invalid,
            AuthKind::Anonymous,
            AuthKind::Anonymous
        ]
    );
    assert!(server.requests().iter().all(|r| r.user.is_none()));
}

#[tokio::test]
async fn password_posts_need_the_crumb_of_their_session() {
    let (server, client) = server().await;
    let id = server.enqueue("build", "linux");
    let cancel = |crumb: Option<&str>, cookie: Option<&str>| {
        let mut request = client
            .post(format!("{}/queue/cancelItem?id={id}", server.url()))
            .basic_auth(USER, Some(PASSWORD));
        if let Some(crumb) = crumb {
            request = request.header("Jenkins-Crumb", crumb);
        }
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, cookie);
        }
        request.send()
    };

    // Reads with a password need no crumb.
    let read = client
        .get(format!("{}/queue/api/json", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);

    let no_crumb = cancel(None, None).await.unwrap();
    assert_eq!(no_crumb.status(), StatusCode::FORBIDDEN);
    assert!(
        no_crumb
            .text()
            .await
            .unwrap()
            .contains("No valid crumb was included in the request")
    );

    let issued = client
        .get(format!("{}/crumbIssuer/api/json", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), StatusCode::OK);
    let set_cookie = issued.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(set_cookie.starts_with("JSESSIONID."), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let body: Value = issued.json().await.unwrap();
    assert_eq!(body["_class"], "hudson.security.csrf.DefaultCrumbIssuer");
    assert_eq!(body["crumbRequestField"], "Jenkins-Crumb");
    let crumb = body["crumb"].as_str().unwrap().to_owned();

    // The crumb alone (a new session) is not enough, nor the cookie alone.
    let crumb_only = cancel(Some(&crumb), None).await.unwrap();
    assert_eq!(crumb_only.status(), StatusCode::FORBIDDEN);
    let cookie_only = cancel(None, Some(&cookie)).await.unwrap();
    assert_eq!(cookie_only.status(), StatusCode::FORBIDDEN);
    let wrong_crumb = cancel(Some("0000"), Some(&cookie)).await.unwrap();
    assert_eq!(wrong_crumb.status(), StatusCode::FORBIDDEN);
    // A crumb from another session does not fit this one.
    let other = client
        .get(format!("{}/crumbIssuer/api/json", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    let other_cookie = other.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    let other_cookie = other_cookie.split(';').next().unwrap().to_owned();
    assert_ne!(other_cookie, cookie);
    let mixed = cancel(Some(&crumb), Some(&other_cookie)).await.unwrap();
    assert_eq!(mixed.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.queue_ids(), [id]);

    let ok = cancel(Some(&crumb), Some(&cookie)).await.unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    assert!(server.queue_ids().is_empty());
    assert_eq!(server.requests().last().unwrap().auth, AuthKind::Password);

    // Without CSRF protection there is no crumb issuer and passwords post freely.
    server.require_crumb_for_passwords(false);
    let id = server.enqueue("other", "linux");
    let gone = client
        .get(format!("{}/crumbIssuer/api/json", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let free = client
        .post(format!("{}/queue/cancelItem?id={id}", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(free.status(), StatusCode::NO_CONTENT);
    assert!(server.queue_ids().is_empty());
}

#[tokio::test]
async fn why_follows_the_label_state() {
    let (server, client) = server().await;
    // No agents at all: Jenkins does not talk about labels.
    let first = server.enqueue("build", "linux");
    assert_eq!(
        why_of(&client, &server, first).await,
        "Waiting for next available executor"
    );
    let item = json(
        get(&client, &server, &format!("/queue/item/{first}/api/json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(item["_class"], "hudson.model.Queue$BuildableItem");
    assert_eq!(item["task"]["name"], "build");
    assert_eq!(item["task"]["url"], format!("{}/job/build/", server.url()));
    assert_eq!(item["url"], format!("queue/item/{first}/"));
    assert_eq!(item["buildable"], true);
    assert_eq!(item["stuck"], true);
    assert!(item["inQueueSince"].as_u64().unwrap() > 1_600_000_000_000);

    // An agent with another label exists: the label has no nodes.
    let created = create_node(
        &client,
        &server,
        "windows-1",
        "hudson.slaves.DumbSlave",
        &node_json("windows-1", "windows").to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    assert_eq!(
        why_of(&client, &server, first).await,
        "There are no nodes with the label \u{2018}linux\u{2019}"
    );

    // One node carries the label: Jenkins names the node.
    for name in ["linux-a", "linux-b"] {
        let created = create_node(
            &client,
            &server,
            name,
            "hudson.slaves.DumbSlave",
            &node_json(name, "linux big").to_string(),
        )
        .await;
        assert_eq!(created.status(), StatusCode::FOUND);
        if name == "linux-a" {
            assert_eq!(
                why_of(&client, &server, first).await,
                "\u{2018}linux-a\u{2019} is offline"
            );
        }
    }
    assert_eq!(
        why_of(&client, &server, first).await,
        "All nodes of label \u{2018}linux\u{2019} are offline"
    );

    // Online and busy: waiting for an executor on the label.
    let secret = jnlp_secret(&client, &server, "linux-a").await;
    assert!(server.connect_agent("linux-a", &secret));
    assert!(server.queue_ids().is_empty(), "first build started");
    let second = server.enqueue("test", "linux");
    assert_eq!(
        whys(&client, &server).await,
        [(
            second,
            "Waiting for next available executor on \u{2018}linux\u{2019}".to_owned()
        )]
    );
    let item = json(
        get(&client, &server, &format!("/queue/item/{second}/api/json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(item["stuck"], false);

    // A label only one busy node carries names that node.
    let third = server.enqueue("deploy", "linux-a");
    assert_eq!(
        why_of(&client, &server, third).await,
        "Waiting for next available executor on \u{2018}linux-a\u{2019}"
    );
}

#[tokio::test]
async fn why_is_localized_without_accept_language_en() {
    let (server, client) = server().await;
    server.set_why_language(WhyLanguage::German);
    let id = server.enqueue("build", "linux");
    let created = create_node(
        &client,
        &server,
        "other",
        "hudson.slaves.DumbSlave",
        &node_json("other", "windows").to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    let url = format!("{}/queue/item/{id}/api/json", server.url());
    let german: Value = client
        .get(&url)
        .basic_auth(USER, Some(TOKEN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        german["why"],
        "Es gibt keine Knoten mit dem Label \u{2018}linux\u{2019}"
    );
    assert_eq!(
        why_of(&client, &server, id).await,
        "There are no nodes with the label \u{2018}linux\u{2019}"
    );
    let requests = server.requests();
    let last_two: Vec<Option<&str>> = requests[requests.len() - 2..]
        .iter()
        .map(|r| r.accept_language.as_deref())
        .collect();
    assert_eq!(last_two, [None, Some("en")]);
}

#[tokio::test]
async fn creating_a_node_records_its_configuration() {
    let (server, client) = server().await;
    let created = create_node(
        &client,
        &server,
        "kiln-ab12",
        "hudson.slaves.DumbSlave",
        &node_json("ignored", "linux").to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    assert_eq!(
        created.headers()[LOCATION],
        format!("{}/computer/", server.url()).as_str()
    );
    let nodes = server.nodes();
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(
        node.name, "kiln-ab12",
        "the form's name wins over the JSON's"
    );
    assert_eq!(node.label_string, "linux");
    assert_eq!(node.num_executors, 1);
    assert_eq!(node.mode, "EXCLUSIVE");
    assert_eq!(node.remote_fs, "/home/jenkins/agent");
    assert_eq!(node.launcher["stapler-class"], "hudson.slaves.JNLPLauncher");
    assert_eq!(node.launcher["webSocket"], true);
    assert!(!node.connected && !node.temporarily_offline && node.running.is_empty());

    let duplicate = create_node(
        &client,
        &server,
        "kiln-ab12",
        "hudson.slaves.DumbSlave",
        &node_json("kiln-ab12", "linux").to_string(),
    )
    .await;
    assert_eq!(duplicate.status(), StatusCode::BAD_REQUEST);
    assert!(
        duplicate
            .text()
            .await
            .unwrap()
            .contains("Agent called \u{2018}kiln-ab12\u{2019} already exists")
    );
    for (name, kind, body) in [
        ("x1", "hudson.slaves.DumbSlave", "{not json"),
        ("x2", "hudson.slaves.DumbSlave", "[1]"),
        (
            "x3",
            "hudson.slaves.DumbSlave",
            r#"{"numExecutors":0,"launcher":{"stapler-class":"hudson.slaves.JNLPLauncher"}}"#,
        ),
        ("x4", "hudson.slaves.DumbSlave", r#"{"numExecutors":1}"#),
        (
            "x5",
            "hudson.slaves.DumbSlave",
            r#"{"mode":"SOMETIMES","launcher":{"stapler-class":"hudson.slaves.JNLPLauncher"}}"#,
        ),
        ("bad/name", "hudson.slaves.DumbSlave", "{}"),
        ("", "hudson.slaves.DumbSlave", "{}"),
    ] {
        let refused = create_node(&client, &server, name, kind, body).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{name} {body}");
    }
    let wrong_type = create_node(
        &client,
        &server,
        "x6",
        "hudson.model.Computer",
        &node_json("x6", "linux").to_string(),
    )
    .await;
    assert!(wrong_type.status().is_server_error());
    assert_eq!(server.nodes().len(), 1);

    // The computer list always includes the built-in node.
    let computers = json(
        get(
            &client,
            &server,
            "/computer/api/json?tree=computer[displayName,offline]",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        computers["computer"],
        json!([
            {"_class": "hudson.model.Hudson$MasterComputer", "displayName": "Built-In Node", "offline": false},
            {"_class": "hudson.slaves.SlaveComputer", "displayName": "kiln-ab12", "offline": true},
        ])
    );
}

#[tokio::test]
async fn jnlp_carries_the_node_secret() {
    let (server, client) = server().await;
    let created = create_node(
        &client,
        &server,
        "kiln-1",
        "hudson.slaves.DumbSlave",
        &node_json("kiln-1", "linux").to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    let response = get(&client, &server, "/computer/kiln-1/jenkins-agent.jnlp")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "application/x-java-jnlp-file"
    );
    let xml = response.text().await.unwrap();
    let secret = server.node_secret("kiln-1").unwrap();
    assert_eq!(secret.len(), 64);
    assert!(xml.contains(&format!(
        "<application-desc main-class=\"hudson.remoting.jnlp.Main\"><argument>{secret}</argument><argument>kiln-1</argument><argument>-webSocket</argument><argument>-url</argument><argument>{}/</argument>",
        server.url()
    )), "{xml}");
    assert_eq!(jnlp_secret(&client, &server, "kiln-1").await, secret);

    let missing = get(&client, &server, "/computer/nope/jenkins-agent.jnlp")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(server.node_secret("nope"), None);

    // The secret depends on the name only: a node re-created under the same name gets the same one.
    let deleted = post(&client, &server, "/computer/kiln-1/doDelete")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::FOUND);
    let again = create_node(
        &client,
        &server,
        "kiln-1",
        "hudson.slaves.DumbSlave",
        &node_json("kiln-1", "linux").to_string(),
    )
    .await;
    assert_eq!(again.status(), StatusCode::FOUND);
    assert_eq!(server.node_secret("kiln-1").unwrap(), secret);

    assert!(!server.connect_agent("kiln-1", "0123"));
    assert!(!server.connect_agent("nope", &secret));
    assert!(!server.nodes()[0].connected);
    assert!(server.connect_agent("kiln-1", &secret));
    assert!(
        !server.connect_agent("kiln-1", &secret),
        "already connected"
    );
}

#[tokio::test]
async fn a_connected_agent_takes_the_waiting_item() {
    let (server, client) = server().await;
    let id = server.enqueue("build", "linux");
    let created = create_node(
        &client,
        &server,
        "kiln-1",
        "hudson.slaves.DumbSlave",
        &node_json("kiln-1", "linux").to_string(),
    )
    .await;
    assert_eq!(created.status(), StatusCode::FOUND);
    assert_eq!(server.queue_ids(), [id], "not before the agent connects");
    assert!(server.builds().is_empty());

    let secret = jnlp_secret(&client, &server, "kiln-1").await;
    assert!(server.connect_agent("kiln-1", &secret));
    assert!(server.queue_ids().is_empty());
    let queue = json(
        get(&client, &server, "/queue/api/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(queue["items"], json!([]));
    let builds = server.builds();
    assert_eq!(builds.len(), 1);
    assert_eq!(
        (
            builds[0].job.as_str(),
            builds[0].number,
            builds[0].queue_id,
            builds[0].node.as_str()
        ),
        ("build", 1, id, "kiln-1")
    );
    assert_eq!(builds[0].result, None);

    let left = json(
        get(&client, &server, &format!("/queue/item/{id}/api/json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(left["_class"], "hudson.model.Queue$LeftItem");
    assert_eq!(left["executable"]["number"], 1);
    let build_url = format!("{}/job/build/1/", server.url());
    assert_eq!(left["executable"]["url"], build_url.as_str());

    let state = computer(&client, &server, "kiln-1").await;
    assert_eq!(state["offline"], false);
    assert_eq!(state["idle"], false);
    assert_eq!(
        state["executors"],
        json!([{"_class": "hudson.model.Executor", "idle": false,
            "currentExecutable": {"_class": "hudson.model.FreeStyleBuild", "url": build_url}}])
    );
    assert_eq!(server.nodes()[0].running, [("build".to_owned(), 1)]);
    let build = json(
        get(&client, &server, "/job/build/1/api/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(build["building"], true);
    assert_eq!(build["builtOn"], "kiln-1");
    let job = json(
        get(
            &client,
            &server,
            "/job/build/api/json?tree=assignedLabelString",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(job["assignedLabelString"], "linux");
}

#[tokio::test]
async fn toggle_offline_keeps_the_build_and_finish_frees_the_node() {
    let (server, client) = server().await;
    online_node(&client, &server, "kiln-1", "linux").await;
    server.enqueue("build", "linux");
    assert_eq!(server.builds().len(), 1);

    let toggled = post(
        &client,
        &server,
        "/computer/kiln-1/toggleOffline?offlineMessage=kiln%3A%20one-shot",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(toggled.status(), StatusCode::FOUND);
    let state = computer(&client, &server, "kiln-1").await;
    assert_eq!(state["temporarilyOffline"], true);
    assert_eq!(state["offline"], true);
    assert_eq!(state["offlineCauseReason"], "kiln: one-shot");
    let full = json(
        get(
            &client,
            &server,
            "/computer/kiln-1/api/json?tree=offlineCause[description]",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        full["offlineCause"]["description"],
        format!("Disconnected by {USER} : kiln: one-shot")
    );
    assert_eq!(state["idle"], false, "the build goes on");
    assert_eq!(server.builds()[0].result, None);
    assert_eq!(
        server.nodes()[0].offline_message.as_deref(),
        Some("kiln: one-shot")
    );

    let next = server.enqueue("test", "linux");
    assert_eq!(
        why_of(&client, &server, next).await,
        "\u{2018}kiln-1\u{2019} is offline"
    );

    server.finish_build("kiln-1", "SUCCESS");
    assert_eq!(server.builds()[0].result.as_deref(), Some("SUCCESS"));
    let state = computer(&client, &server, "kiln-1").await;
    assert_eq!(state["idle"], true);
    assert_eq!(state["executors"][0]["currentExecutable"], Value::Null);
    assert_eq!(server.queue_ids(), [next], "an offline node takes nothing");

    let deleted = post(&client, &server, "/computer/kiln-1/doDelete")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::FOUND);
    assert_eq!(server.deleted_nodes(), ["kiln-1"]);
    assert_eq!(server.builds()[0].result.as_deref(), Some("SUCCESS"));
    let gone = get(&client, &server, "/computer/kiln-1/api/json")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    for path in [
        "/computer/kiln-1/doDelete",
        "/computer/kiln-1/toggleOffline",
    ] {
        let unknown = post(&client, &server, path).send().await.unwrap();
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let built_in = post(&client, &server, "/computer/(built-in)/doDelete")
        .send()
        .await
        .unwrap();
    assert_eq!(built_in.status(), StatusCode::BAD_REQUEST);
    let by_get = get(&client, &server, "/computer/kiln-1/doDelete")
        .send()
        .await
        .unwrap();
    assert_eq!(by_get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn deleting_a_busy_node_aborts_its_build() {
    let (server, client) = server().await;
    online_node(&client, &server, "kiln-1", "linux").await;
    let id = server.enqueue("build", "linux");
    assert_eq!(server.builds()[0].queue_id, id);
    // The agent pod vanishes: the build hangs on the node until the node is deleted.
    server.disconnect_agent("kiln-1");
    let state = computer(&client, &server, "kiln-1").await;
    assert_eq!(state["offline"], true);
    assert_eq!(state["idle"], false);
    assert_eq!(server.builds()[0].result, None);

    let deleted = post(&client, &server, "/computer/kiln-1/doDelete")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::FOUND);
    assert_eq!(server.builds()[0].result.as_deref(), Some("ABORTED"));
    assert!(server.nodes().is_empty());
    assert_eq!(server.deleted_nodes(), ["kiln-1"]);
    let secret = server.node_secret("kiln-1");
    assert_eq!(secret, None);
}

#[tokio::test]
async fn second_item_waits_for_the_only_executor() {
    let (server, client) = server().await;
    online_node(&client, &server, "kiln-1", "linux").await;
    let first = server.enqueue("build", "linux");
    let second = server.enqueue("test", "linux");
    assert_eq!(
        server.enqueue("test", "linux"),
        second,
        "a queued job is not queued twice"
    );
    assert_eq!(server.queue_ids(), [second]);
    assert_eq!(
        whys(&client, &server).await,
        [(
            second,
            "Waiting for next available executor on \u{2018}kiln-1\u{2019}".to_owned()
        )]
    );

    server.finish_build("kiln-1", "FAILURE");
    assert!(server.queue_ids().is_empty());
    let builds = server.builds();
    assert_eq!(
        builds
            .iter()
            .map(|b| (b.queue_id, b.result.as_deref()))
            .collect::<Vec<_>>(),
        [(first, Some("FAILURE")), (second, None)]
    );
    assert_eq!(builds[1].node, "kiln-1");
}

#[tokio::test]
async fn tree_keeps_only_the_named_fields() {
    let (server, client) = server().await;
    let id = server.enqueue("build", "linux");
    let queue = json(
        get(
            &client,
            &server,
            "/queue/api/json?tree=items[id,task[name]]",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        queue,
        json!({"_class": "hudson.model.Queue", "items": [
            {"_class": "hudson.model.Queue$BuildableItem", "id": id,
             "task": {"_class": "hudson.model.FreeStyleProject", "name": "build"}}
        ]})
    );
    let bad = get(&client, &server, "/queue/api/json?tree=items[id")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}
