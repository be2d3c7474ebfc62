//! The reference demo's applications (../shared/reference/): the guide's
//! `dataproducer` and `httpserver`, and the blog's `hit-counter` in front of a
//! `redis`, as images built locally from busybox (and Debian's Redis). The demo
//! and the attach benchmark both use them.

use std::path::Path;

use crate::docker::{BUSYBOX, Dockerd};

/// The image with the guide's two applications and the hit counter.
pub const APPS: &str = "weft-demo/apps";

/// The data producer: every connection on 4540 gets one line with the
/// container's address (`hostname -i`, from the /etc/hosts weft wrote).
pub const DATAPRODUCER: &str = r#"#!/bin/sh
# The guide's data producer: one message per connection on TCP 4540.
exec nc -ll -p 4540 -e /bin/sh -c 'echo "Hi, this is the data producer in $(hostname -i)"'
"#;

/// The HTTP server's page: one message from a data producer per request
/// (`nc dataproducer 4540`: weft's DNS shuffles the answers, so requests spread
/// over the producers of every host).
pub const HTTPSERVER_CGI: &str = r#"#!/bin/sh
DATA_PRODUCER_MESSAGE=$(nc -w 3 dataproducer 4540)
printf 'Content-Type: text/html\r\n\r\n'
echo "<html> <head> <title>weft sample app</title> </head><body> <div style=color:white;text-align:center> <h1>Chosen data producer message:</h1> <h2>${DATA_PRODUCER_MESSAGE}</h2> </div></body></html>"
"#;

/// The hit counter: INCR in the `redis` container, by name.
pub const HIT_COUNTER_CGI: &str = r#"#!/bin/sh
HITS=$(printf 'INCR hits\r\nQUIT\r\n' | nc -w 3 redis 6379 | head -n 1 | tr -d ':\r')
printf 'Content-Type: text/plain\r\n\r\n'
echo "Hello from $(hostname -i)! I have been seen ${HITS:-?} times."
"#;

/// After `FROM <busybox image>`.
const DOCKERFILE: &str = r#"
COPY dataproducer /bin/dataproducer
COPY httpserver.cgi /www/httpserver/cgi-bin/index.cgi
COPY hit-counter.cgi /www/hit-counter/cgi-bin/index.cgi
RUN chmod 755 /bin/dataproducer /www/httpserver/cgi-bin/index.cgi /www/hit-counter/cgi-bin/index.cgi
CMD ["/bin/dataproducer"]
"#;

/// `docker run` arguments (after the name) for each application.
pub fn httpserver_cmd() -> Vec<&'static str> {
    vec![APPS, "httpd", "-f", "-p", "80", "-h", "/www/httpserver"]
}

pub fn dataproducer_cmd() -> Vec<&'static str> {
    vec![APPS, "/bin/dataproducer"]
}

pub fn hit_counter_cmd() -> Vec<&'static str> {
    vec![APPS, "httpd", "-f", "-p", "80", "-h", "/www/hit-counter"]
}

pub fn redis_cmd() -> Vec<&'static str> {
    vec![crate::docker::REDIS, "redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
}

/// Builds [`APPS`] with `docker build` (a real build through whatever
/// `docker` talks to: the proxy in the demo) from the busybox image.
pub fn build_apps(docker: &mut std::process::Command) -> Result<(), String> {
    let ctx = crate::cleanup::TempPath::dir(&crate::unique("apps")).map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str| std::fs::write(ctx.join(name), text).map_err(|e| e.to_string());
    let result = (|| {
        write("Dockerfile", &format!("FROM {BUSYBOX}{DOCKERFILE}"))?;
        write("dataproducer", DATAPRODUCER)?;
        write("httpserver.cgi", HTTPSERVER_CGI)?;
        write("hit-counter.cgi", HIT_COUNTER_CGI)?;
        let out = docker
            .args(["build", "-q", "-t", APPS])
            .arg(ctx.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() { Ok(()) } else { Err(format!("docker build: {}", String::from_utf8_lossy(&out.stderr))) }
    })();
    drop(ctx);
    result
}

/// Loads the Redis image into `dockerd`, building the rootfs on first use.
pub fn load_redis(dockerd: &Dockerd) -> Result<(), String> {
    let tar = crate::docker::redis_rootfs()?;
    dockerd.import(
        Path::new(&tar),
        crate::docker::REDIS,
        &["ENV PATH=/usr/bin:/bin", "ENV LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu", "WORKDIR /data"],
    );
    Ok(())
}

/// An HTTP GET of `path` on `addr`:80 from `ns` (the simulated host's own
/// namespace); the body of a 200, or None.
pub fn http_get(ns: &crate::Netns, addr: std::net::Ipv4Addr, path: &str) -> Option<String> {
    match crate::http_request(ns, (addr, 80).into(), "GET", path, "") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// The `<h2>` of the httpserver's page: the data producer's message.
pub fn producer_message(page: &str) -> Option<&str> {
    let start = page.find("<h2>")? + 4;
    let end = page[start..].find("</h2>")? + start;
    Some(page[start..end].trim())
}
