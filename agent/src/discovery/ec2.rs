//! EC2's DescribeInstances, the one EC2 call discovery needs, without
//! aws-sdk-ec2 (minutes of rustc and hundreds of MB for one call): EC2 speaks
//! the Query protocol (a form POST, an XML reply), so the request is signed
//! with the SDK's own SigV4 signer, sent over the SDK's HTTP connector and the
//! reply parsed with quick-xml.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::Connector;
use aws_smithy_runtime_api::client::http::HttpConnector;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use quick_xml::events::Event;

use super::SourceError;

/// The API version the Query protocol names.
const VERSION: &str = "2016-11-15";
/// One request's limit (the SDK's own calls have their own timeouts).
const TIMEOUT: Duration = Duration::from_secs(20);

/// An instance as discovery needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub private_ip: Option<Ipv4Addr>,
    /// pending, running, shutting-down, terminated, stopping, stopped.
    pub state: String,
    pub tags: BTreeMap<String, String>,
}

/// A DescribeInstances client.
pub struct Ec2 {
    /// `https://ec2.REGION.amazonaws.com/`, or the endpoint override.
    pub endpoint: String,
    pub region: String,
    pub credentials: SharedCredentialsProvider,
    pub connector: Connector,
}

impl Ec2 {
    /// Instances by id and/or filters (`tag:KEY`, `instance-state-name`...), all pages.
    pub async fn describe_instances(&self, ids: &[String], filters: &[(&str, Vec<String>)]) -> Result<Vec<Instance>, SourceError> {
        let mut params: Vec<(String, String)> = vec![("Action".into(), "DescribeInstances".into()), ("Version".into(), VERSION.into())];
        for (i, id) in ids.iter().enumerate() {
            params.push((format!("InstanceId.{}", i + 1), id.clone()));
        }
        for (i, (name, values)) in filters.iter().enumerate() {
            params.push((format!("Filter.{}.Name", i + 1), (*name).to_string()));
            for (j, v) in values.iter().enumerate() {
                params.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.clone()));
            }
        }
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut page = params.clone();
            if let Some(t) = &token {
                page.push(("NextToken".into(), t.clone()));
            }
            let body = form_encode(&page);
            let xml = self.call(body).await?;
            let (instances, next) = parse_describe_instances(&xml)?;
            all.extend(instances);
            match next {
                Some(t) if !t.is_empty() && token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// One signed POST; the reply body, or an error naming the cause.
    async fn call(&self, body: String) -> Result<String, SourceError> {
        let creds = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| SourceError(format!("no AWS credentials for EC2 DescribeInstances: {e} (give the instance a role with ec2:DescribeInstances, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")))?;
        let identity = Identity::from(creds);
        let settings = SigningSettings::default();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| SourceError(format!("cannot sign the EC2 request: {e}")))?
            .into();
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let host = self.endpoint.split("://").nth(1).unwrap_or(&self.endpoint).split('/').next().unwrap_or_default().to_string();
        let headers = [("content-type", content_type), ("host", host.as_str())];
        let signable = SignableRequest::new("POST", &self.endpoint, headers.iter().copied(), SignableBody::Bytes(body.as_bytes()))
            .map_err(|e| SourceError(format!("cannot sign the EC2 request: {e}")))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| SourceError(format!("cannot sign the EC2 request: {e}")))?.into_parts();
        let mut req = aws_smithy_runtime_api::http::Request::new(SdkBody::from(body));
        req.set_method("POST").map_err(|e| SourceError(e.to_string()))?;
        req.set_uri(self.endpoint.as_str()).map_err(|e| SourceError(format!("bad EC2 endpoint {}: {e}", self.endpoint)))?;
        req.headers_mut().insert("content-type", content_type);
        for (name, value) in instructions.headers() {
            req.headers_mut().insert(name.to_string(), value.to_string());
        }
        let resp = tokio::time::timeout(TIMEOUT, self.connector.call(req))
            .await
            .map_err(|_| SourceError(format!("EC2 at {} did not answer within {TIMEOUT:?}", self.endpoint)))?
            .map_err(|e| SourceError(format!("cannot reach EC2 at {}: {e:?}", self.endpoint)))?;
        let status = resp.status().as_u16();
        let bytes = ByteStream::new(resp.into_body())
            .collect()
            .await
            .map_err(|e| SourceError(format!("EC2 reply cut short: {e}")))?
            .into_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status != 200 {
            let (code, message) = parse_error(&text);
            let hint = match (status, code.as_str()) {
                (_, "RequestLimitExceeded" | "Throttling" | "ThrottlingException") => " (throttled: weft backs off)",
                (_, "UnauthorizedOperation" | "AuthFailure") => " (the instance role needs ec2:DescribeInstances)",
                (500..=599, _) => " (EC2 is having trouble: weft retries)",
                _ => "",
            };
            return Err(SourceError(format!("EC2 DescribeInstances answered {status} {code}: {message}{hint}")));
        }
        Ok(text)
    }
}

/// `application/x-www-form-urlencoded`, as SigV4 and EC2 expect it.
fn form_encode(params: &[(String, String)]) -> String {
    let enc = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// The instances of a DescribeInstances reply, and its nextToken.
pub fn parse_describe_instances(xml: &str) -> Result<(Vec<Instance>, Option<String>), SourceError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut cur: Option<Instance> = None;
    let mut tag_key: Option<String> = None;
    let mut next = None;
    let bad = |e: &dyn std::fmt::Display| SourceError(format!("EC2 sent a reply weft cannot read: {e}"));
    // Index of the instance `item` in `path`, when inside one.
    let instance_at = |path: &[String]| path.windows(2).position(|w| w[0] == "instancesSet" && w[1] == "item").map(|i| i + 1);
    // Text of the element being read: quick-xml hands entity references
    // (`&amp;`) over as events of their own.
    let mut text = String::new();
    loop {
        match reader.read_event().map_err(|e| bad(&e))? {
            Event::Start(e) => {
                path.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
                text.clear();
                if path.len() >= 2 && path[path.len() - 2] == "instancesSet" && path[path.len() - 1] == "item" && cur.is_none() {
                    cur = Some(Instance::default());
                }
            }
            Event::Text(t) => text.push_str(&t.xml_content().map_err(|e| bad(&e))?),
            Event::GeneralRef(r) => {
                let name = String::from_utf8_lossy(&r).into_owned();
                let c = match name.as_str() {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    n => n
                        .strip_prefix("#x")
                        .map(|h| u32::from_str_radix(h, 16))
                        .or_else(|| n.strip_prefix('#').map(str::parse::<u32>))
                        .and_then(Result::ok)
                        .and_then(char::from_u32),
                };
                text.push(c.ok_or_else(|| bad(&format!("unknown entity &{name};")))?);
            }
            Event::End(_) => {
                let value = std::mem::take(&mut text).trim().to_string();
                match instance_at(&path) {
                    Some(i) if path.len() == i + 1 => out.extend(cur.take()),
                    Some(i) => {
                        let rel: Vec<&str> = path[i + 1..].iter().map(String::as_str).collect();
                        if let Some(inst) = cur.as_mut() {
                            match rel.as_slice() {
                                ["instanceId"] => inst.id = value,
                                ["privateIpAddress"] => inst.private_ip = value.parse().ok(),
                                ["instanceState", "name"] => inst.state = value,
                                ["tagSet", "item", "key"] => tag_key = Some(value),
                                ["tagSet", "item", "value"] => {
                                    if let Some(k) = tag_key.take() {
                                        inst.tags.insert(k, value);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    None if path.len() == 2 && path[1] == "nextToken" => next = Some(value),
                    None => {}
                }
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !xml.contains("DescribeInstancesResponse") {
        return Err(SourceError(format!("EC2 sent something else than a DescribeInstances reply: {:.200}", xml)));
    }
    Ok((out, next))
}

/// Code and message of an EC2 error reply (or what there is).
fn parse_error(xml: &str) -> (String, String) {
    let pick = |tag: &str| {
        let open = format!("<{tag}>");
        let start = xml.find(&open)? + open.len();
        let end = xml[start..].find(&format!("</{tag}>"))? + start;
        Some(xml[start..end].to_string())
    };
    (pick("Code").unwrap_or_else(|| "error".into()), pick("Message").unwrap_or_else(|| format!("{:.200}", xml.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <reservationSet>
    <item>
      <reservationId>r-abc</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-1</instanceId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <privateIpAddress>10.0.0.11</privateIpAddress>
          <networkInterfaceSet><item><privateIpAddress>10.9.9.9</privateIpAddress>
            <privateIpAddressesSet><item><privateIpAddress>10.9.9.8</privateIpAddress></item></privateIpAddressesSet>
          </item></networkInterfaceSet>
          <tagSet>
            <item><key>weave:peerGroupName</key><value>blue</value></item>
            <item><key>Name</key><value>web &amp; api</value></item>
          </tagSet>
        </item>
        <item>
          <instanceId>i-2</instanceId>
          <instanceState><code>48</code><name>terminated</name></instanceState>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>page2</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn instances_their_own_address_state_and_tags() {
        let (got, next) = parse_describe_instances(REPLY).unwrap();
        assert_eq!(next.as_deref(), Some("page2"));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, "i-1");
        assert_eq!(got[0].private_ip, Some(Ipv4Addr::new(10, 0, 0, 11)), "not a network interface's address");
        assert_eq!(got[0].state, "running");
        assert_eq!(got[0].tags.get("weave:peerGroupName").map(String::as_str), Some("blue"));
        assert_eq!(got[0].tags.get("Name").map(String::as_str), Some("web & api"));
        assert_eq!((got[1].id.as_str(), got[1].private_ip, got[1].state.as_str()), ("i-2", None, "terminated"));
    }

    #[test]
    fn bad_replies_are_errors_not_panics() {
        assert!(parse_describe_instances("<html>502 Bad Gateway</html>").is_err());
        assert!(parse_describe_instances("<DescribeInstancesResponse><reservationSet><item>").is_ok_and(|(i, _)| i.is_empty()));
        assert!(parse_describe_instances("\u{0}<<<").is_err());
        let (code, msg) = parse_error("<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors></Response>");
        assert_eq!((code.as_str(), msg.as_str()), ("RequestLimitExceeded", "Request limit exceeded."));
    }

    #[test]
    fn form_encoding_escapes_what_it_must() {
        let p = vec![("Filter.1.Name".to_string(), "tag:weave:peerGroupName".to_string()), ("V".into(), "a b/c~".into())];
        assert_eq!(form_encode(&p), "Filter.1.Name=tag%3Aweave%3ApeerGroupName&V=a%20b%2Fc~");
    }

    proptest::proptest! {
        #[test]
        fn any_reply_parses_or_errors(s in ".{0,400}") {
            let _ = parse_describe_instances(&s);
            let _ = parse_error(&s);
        }
    }
}
