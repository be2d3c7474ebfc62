//! The one request the proxy changes: `POST /containers/create`. Pure functions
//! over the request's JSON (unit- and property-tested), applied by the proxy.
//!
//! For a container weft will attach (see [`super::container::plan`]):
//! - DNS: weft's server (this host's overlay address) and the search domain,
//!   unless the request sets its own;
//! - hostname: the container's name (or the name label), in the weft domain,
//!   unless the request sets one;
//! - the application waits for `ethwe`: `/w/w` (weft-wait, bind-mounted
//!   read-only) goes in front of the entrypoint, taking the image's entrypoint
//!   and command when the request does not override them.
//!
//! Anything unexpected (not an object, a field of the wrong type) leaves the
//! request as it came: Docker answers it with its own error.

use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::container::{Naming, valid_dns_name};

/// Where weft-wait appears in containers.
pub const WAIT_PATH: &str = "/w/w";

/// What the rewrite needs to know.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub naming: Naming,
    /// weft's DNS server for containers (unknown until this host is on the overlay).
    pub dns_server: Option<Ipv4Addr>,
    /// The host path of weft-wait, bind-mounted at [`WAIT_PATH`].
    pub wait_binary: Option<String>,
}

/// An image's entrypoint and command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

impl ImageConfig {
    /// From `GET /images/{name}/json`.
    pub fn from_inspect(v: &Value) -> ImageConfig {
        let config = field(v, "Config");
        ImageConfig {
            entrypoint: config.and_then(|c| field(c, "Entrypoint")).and_then(strings),
            cmd: config.and_then(|c| field(c, "Cmd")).and_then(strings),
        }
    }
}

/// What the rewrite did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Rewritten(Vec<&'static str>),
    Untouched(String),
}

/// A key of a JSON object, matched without regard to case as Docker (Go's
/// encoding/json) matches them; the request's own spelling is kept.
fn key_of(obj: &Map<String, Value>, key: &str) -> String {
    obj.keys().find(|k| k.eq_ignore_ascii_case(key)).cloned().unwrap_or_else(|| key.to_string())
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.get(&key_of(obj, key)).filter(|v| !v.is_null())
}

/// A string or an array of strings (Docker's StrSlice); `None` for anything else.
fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Whether the request leaves the entrypoint to the image: then the proxy asks
/// Docker for the image's (returned: the image's name).
pub fn image_needed(body: &Value, opts: &Options) -> Option<String> {
    opts.wait_binary.as_ref()?;
    if field(body, "Entrypoint").is_some() {
        return None;
    }
    field(body, "Image").and_then(Value::as_str).map(str::to_string)
}

/// Rewrites a create request for a container named `name` (the `?name=` of the
/// request, if any). `image` is what [`image_needed`] asked for, if found.
pub fn rewrite(body: &mut Value, name: Option<&str>, image: Option<&ImageConfig>, opts: &Options) -> Outcome {
    let Some(obj) = body.as_object_mut() else {
        return Outcome::Untouched("the body is not a JSON object".into());
    };
    let hc_key = key_of(obj, "HostConfig");
    let network_mode = match obj.get(&hc_key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::Object(hc)) => match hc.get(&key_of(hc, "NetworkMode")) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => return Outcome::Untouched("HostConfig.NetworkMode is not a string".into()),
        },
        Some(_) => return Outcome::Untouched("HostConfig is not an object".into()),
    };
    let env = match obj.get(&key_of(obj, "Env")) {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => match strings(v) {
            Some(env) => env,
            None => return Outcome::Untouched("Env is not a list of strings".into()),
        },
    };
    let labels: std::collections::HashMap<String, String> = obj
        .get(&key_of(obj, "Labels"))
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let facts = super::container::Facts { running: true, pid: 1, env, network_mode, ..Default::default() };
    if let Ok(super::container::Plan::Skip(why)) = super::container::plan(&facts, &opts.naming, None) {
        return Outcome::Untouched(format!("weft does not attach it: {why}"));
    }
    if !obj.get(&hc_key).is_some_and(Value::is_object) {
        obj.insert(hc_key.clone(), Value::Object(Map::new()));
    }
    let mut done = Vec::new();

    // DNS server and search domain, unless the request has its own.
    let domain = opts.naming.domain.trim_end_matches('.').to_string();
    if let Some(server) = opts.dns_server {
        let Some(hc) = obj.get_mut(&hc_key).and_then(Value::as_object_mut) else {
            return Outcome::Untouched("its HostConfig is not an object".into());
        };
        let dns_key = key_of(hc, "Dns");
        if is_empty_list(hc.get(&dns_key)) {
            hc.insert(dns_key, Value::from(vec![server.to_string()]));
            done.push("dns");
        }
        let search_key = key_of(hc, "DnsSearch");
        if is_empty_list(hc.get(&search_key)) {
            hc.insert(search_key, Value::from(vec![domain.clone()]));
            done.push("dns-search");
        }
    }

    // Hostname from the name, in the domain, unless the request has one.
    let host_key = key_of(obj, "Hostname");
    if obj.get(&host_key).and_then(Value::as_str).is_none_or(str::is_empty) {
        let base = opts.naming.base_name(&labels, name.unwrap_or(""));
        // A hostname is one label, at most 63 characters (ECS's long names: use
        // the name label).
        if !base.is_empty() && !base.contains('.') && valid_dns_name(&base) {
            obj.insert(host_key, Value::from(base));
            let dom_key = key_of(obj, "Domainname");
            if obj.get(&dom_key).and_then(Value::as_str).is_none_or(str::is_empty) {
                obj.insert(dom_key, Value::from(domain));
            }
            done.push("hostname");
        }
    }

    if let Some(wait) = &opts.wait_binary
        && let Some(what) = wrap_entrypoint(obj, &hc_key, image, wait) {
            done.push(what);
        }
    Outcome::Rewritten(done)
}

fn is_empty_list(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        _ => false,
    }
}

/// Puts weft-wait in front of the entrypoint; `None` when it cannot be done
/// safely (fields of unexpected types, image unknown, nothing to run).
fn wrap_entrypoint(obj: &mut Map<String, Value>, hc_key: &str, image: Option<&ImageConfig>, wait: &str) -> Option<&'static str> {
    let ep_key = key_of(obj, "Entrypoint");
    let cmd_key = key_of(obj, "Cmd");
    let given = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(v) => strings(v).map(Some),
    };
    let entry = given(&ep_key)?;
    let cmd = given(&cmd_key)?;
    let (entry, cmd) = match entry {
        // Setting the entrypoint makes Docker ignore the image's command.
        Some(e) => (e, cmd),
        None => {
            let image = image?;
            (image.entrypoint.clone().unwrap_or_default(), cmd.or_else(|| image.cmd.clone()))
        }
    };
    if entry.first().is_some_and(|e| e == WAIT_PATH) {
        return None;
    }
    if entry.is_empty() && cmd.as_ref().is_none_or(Vec::is_empty) {
        return None; // Docker's own "no command specified" error, not ours.
    }
    let hc = obj.get_mut(hc_key).and_then(Value::as_object_mut)?;
    let binds_key = key_of(hc, "Binds");
    let mut binds = match hc.get(&binds_key) {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(v)?,
    };
    binds.push(format!("{wait}:{WAIT_PATH}:ro"));
    hc.insert(binds_key, Value::from(binds));
    let mut new_entry = vec![WAIT_PATH.to_string()];
    new_entry.extend(entry);
    obj.insert(ep_key, Value::from(new_entry));
    obj.insert(cmd_key, cmd.map_or(Value::Null, Value::from));
    Some("wait")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn opts() -> Options {
        Options {
            naming: Naming { domain: "weave.local.".into(), hostname_from_label: Some("com.amazonaws.ecs.container-name".into()) },
            dns_server: Some(Ipv4Addr::new(10, 32, 0, 1)),
            wait_binary: Some("/var/lib/weft/weft-wait".into()),
        }
    }

    #[test]
    fn a_plain_run_gets_dns_hostname_and_the_wait() {
        let mut body = json!({"Image": "busybox", "Cmd": ["nc", "db", "80"], "HostConfig": {"NetworkMode": "default"}});
        let image = ImageConfig { entrypoint: None, cmd: Some(vec!["/bin/sh".into()]) };
        assert_eq!(image_needed(&body, &opts()), Some("busybox".into()));
        let out = rewrite(&mut body, Some("web"), Some(&image), &opts());
        assert_eq!(out, Outcome::Rewritten(vec!["dns", "dns-search", "hostname", "wait"]));
        assert_eq!(
            body,
            json!({
                "Image": "busybox",
                "Hostname": "web",
                "Domainname": "weave.local",
                "Entrypoint": ["/w/w"],
                "Cmd": ["nc", "db", "80"],
                "HostConfig": {
                    "NetworkMode": "default",
                    "Dns": ["10.32.0.1"],
                    "DnsSearch": ["weave.local"],
                    "Binds": ["/var/lib/weft/weft-wait:/w/w:ro"]
                }
            })
        );
    }

    #[test]
    fn entrypoint_and_command_semantics() {
        let image = ImageConfig { entrypoint: Some(vec!["/entry".into()]), cmd: Some(vec!["serve".into()]) };
        // Image's entrypoint and command both kept.
        let mut b = json!({"Image": "x"});
        rewrite(&mut b, None, Some(&image), &opts());
        assert_eq!((b["Entrypoint"].clone(), b["Cmd"].clone()), (json!(["/w/w", "/entry"]), json!(["serve"])));
        // A new command replaces the image's command only.
        let mut b = json!({"Image": "x", "Cmd": ["other"]});
        rewrite(&mut b, None, Some(&image), &opts());
        assert_eq!((b["Entrypoint"].clone(), b["Cmd"].clone()), (json!(["/w/w", "/entry"]), json!(["other"])));
        // A new entrypoint (string form) drops the image's command.
        let mut b = json!({"Image": "x", "Entrypoint": "/bin/top"});
        assert_eq!(image_needed(&b, &opts()), None);
        rewrite(&mut b, None, None, &opts());
        assert_eq!((b["Entrypoint"].clone(), b["Cmd"].clone()), (json!(["/w/w", "/bin/top"]), Value::Null));
        // Image unknown (not pulled yet): no wait; Docker answers "no such image".
        let mut b = json!({"Image": "x"});
        assert_eq!(rewrite(&mut b, None, None, &opts()), Outcome::Rewritten(vec!["dns", "dns-search"]));
        assert!(b.get("Entrypoint").is_none());
        // Nothing to run: left for Docker to refuse.
        let mut b = json!({"Image": "x"});
        rewrite(&mut b, None, Some(&ImageConfig::default()), &opts());
        assert!(b.get("Entrypoint").is_none());
    }

    #[test]
    fn the_request_s_own_settings_win() {
        let mut b = json!({"Image": "x", "Hostname": "mine", "Entrypoint": ["/w/w", "a"],
                           "HostConfig": {"Dns": ["1.1.1.1"], "DnsSearch": ["corp"], "Binds": ["/a:/b"]}});
        assert_eq!(rewrite(&mut b, Some("web"), None, &opts()), Outcome::Rewritten(vec![]));
        assert_eq!(b["HostConfig"], json!({"Dns": ["1.1.1.1"], "DnsSearch": ["corp"], "Binds": ["/a:/b"]}));
        assert_eq!(b["Hostname"], "mine");
    }

    #[test]
    fn keys_match_without_case_like_docker() {
        let mut b = json!({"image": "x", "hostconfig": {"dns": []}, "cmd": ["a"], "entrypoint": null});
        rewrite(&mut b, Some("web"), Some(&ImageConfig::default()), &opts());
        let obj = b.as_object().unwrap();
        assert!(obj.contains_key("hostconfig") && !obj.contains_key("HostConfig"), "{b}");
        assert_eq!(b["hostconfig"]["dns"], json!(["10.32.0.1"]));
        assert_eq!(b["entrypoint"], json!(["/w/w"]));
    }

    #[test]
    fn containers_weft_leaves_alone() {
        for body in [
            json!({"Image": "x", "HostConfig": {"NetworkMode": "host"}}),
            json!({"Image": "x", "HostConfig": {"NetworkMode": "none"}}),
            json!({"Image": "x", "HostConfig": {"NetworkMode": "container:abc"}}),
            json!({"Image": "x", "Env": ["WEFT_CIDR=none"]}),
            json!({"Image": "x", "Env": ["WEAVE_CIDR=none"]}),
        ] {
            let mut b = body.clone();
            assert!(matches!(rewrite(&mut b, Some("web"), None, &opts()), Outcome::Untouched(_)));
            assert_eq!(b, body);
        }
    }

    #[test]
    fn hostile_shapes_are_passed_on_untouched() {
        for body in [
            json!([1, 2]),
            json!("x"),
            json!({"HostConfig": 5}),
            json!({"HostConfig": "x"}),
            json!({"Env": "WEFT_CIDR=none"}),
            json!({"Env": [1]}),
            json!({"HostConfig": {"NetworkMode": 7}}),
        ] {
            let mut b = body.clone();
            assert!(matches!(rewrite(&mut b, Some("web"), None, &opts()), Outcome::Untouched(_)), "{body}");
            assert_eq!(b, body);
        }
        // A null HostConfig is Docker's "none given".
        let mut b = json!({"Image": "x", "HostConfig": null});
        assert!(matches!(rewrite(&mut b, None, None, &opts()), Outcome::Rewritten(_)));
        // Fields of the wrong type inside: that part is skipped, no panic.
        let mut b = json!({"Image": "x", "Cmd": 5, "HostConfig": {"Binds": 3, "Dns": "x"}});
        rewrite(&mut b, Some("web"), Some(&ImageConfig::default()), &opts());
        assert_eq!(b["HostConfig"]["Binds"], json!(3));
        assert_eq!(b["HostConfig"]["Dns"], json!("x"));
    }

    #[test]
    fn names_that_are_no_hostname_are_not_used() {
        let long = "ecs-weave-ecs-demo-task-1-dataproducer-b8ecddb78a8fecfc3900b8ecddb78a8fecfc3900";
        let mut b = json!({"Image": "x"});
        rewrite(&mut b, Some(long), None, &opts());
        assert!(b.get("Hostname").is_none());
        let mut b = json!({"Image": "x", "Labels": {"com.amazonaws.ecs.container-name": "dataproducer"}});
        rewrite(&mut b, Some(long), None, &opts());
        assert_eq!(b["Hostname"], "dataproducer");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![Just("none".to_string()), Just("host".to_string()), "[ -~]{0,12}"].prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            let keys = prop_oneof![
                Just("HostConfig".to_string()),
                Just("hostconfig".to_string()),
                Just("Env".to_string()),
                Just("Cmd".to_string()),
                Just("Entrypoint".to_string()),
                Just("Hostname".to_string()),
                Just("Labels".to_string()),
                Just("Dns".to_string()),
                Just("Binds".to_string()),
                Just("NetworkMode".to_string()),
                "[a-zA-Z]{1,6}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(keys, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any JSON at all: no panic, and either untouched or still an object
        /// that keeps every key it had.
        #[test]
        fn any_request_is_rewritten_safely_or_left_alone(body in json_value(), name in proptest::option::of("[a-z_.-]{0,70}")) {
            let mut b = body.clone();
            let image = ImageConfig { entrypoint: None, cmd: Some(vec!["sh".into()]) };
            match rewrite(&mut b, name.as_deref(), Some(&image), &opts()) {
                Outcome::Untouched(_) => prop_assert_eq!(&b, &body),
                Outcome::Rewritten(_) => {
                    let (old, new) = (body.as_object().unwrap(), b.as_object().unwrap());
                    prop_assert!(old.keys().all(|k| new.contains_key(k)));
                }
            }
        }
    }
}
