//! Fake provider servers for the provider client tests: axum on 127.0.0.1:0 with in-memory
//! state machines that follow providers.md §5 (endpoints, JSON shapes, status values, error
//! shapes, rate limits). Each fake checks the Bearer key and has knobs for fault injection; time
//! in the state machines advances per read (a host leaves a state after N reads), so tests are
//! fast and do not depend on the clock.

#![allow(dead_code)]

pub mod lambda;
pub mod runpod;
pub mod vast;

use std::net::SocketAddr;

use axum::Router;
use axum::http::HeaderMap;
use tokio::sync::oneshot;

/// The API key every fake accepts.
pub const KEY: &str = "test-key-0123";

/// A running fake server; dropping it stops the server.
pub struct Served {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn serve(router: Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Served {
        addr,
        stop: Some(stop),
    }
}

/// Whether the request carries `Authorization: Bearer KEY`.
pub fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {KEY}"))
}

/// A GraphQL input-object literal (`{name: "x", cloudType: SECURE, env: [{key: "K"}]}`) as JSON;
/// enum values become strings. Only what the RunPod client sends is supported: objects, lists,
/// strings, numbers, booleans, null and bare names.
pub fn graphql_input(query: &str, field: &str) -> Option<serde_json::Value> {
    let start = query.find(&format!("{field}("))? + field.len() + 1;
    let rest = &query[start..];
    let input = rest.find("input:")? + "input:".len();
    let mut parser = GqlParser {
        text: &rest.as_bytes()[input..],
        pos: 0,
    };
    parser.value()
}

struct GqlParser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl GqlParser<'_> {
    fn skip(&mut self) {
        while self.pos < self.text.len()
            && (self.text[self.pos].is_ascii_whitespace() || self.text[self.pos] == b',')
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.text.get(self.pos).copied()
    }

    fn name(&mut self) -> Option<String> {
        self.skip();
        let start = self.pos;
        while self.pos < self.text.len()
            && (self.text[self.pos].is_ascii_alphanumeric() || self.text[self.pos] == b'_')
        {
            self.pos += 1;
        }
        (self.pos > start).then(|| String::from_utf8_lossy(&self.text[start..self.pos]).into())
    }

    fn value(&mut self) -> Option<serde_json::Value> {
        use serde_json::Value;
        match self.peek()? {
            b'{' => {
                self.pos += 1;
                let mut map = serde_json::Map::new();
                loop {
                    if self.peek()? == b'}' {
                        self.pos += 1;
                        return Some(Value::Object(map));
                    }
                    let key = self.name()?;
                    if self.peek()? != b':' {
                        return None;
                    }
                    self.pos += 1;
                    let value = self.value()?;
                    map.insert(key, value);
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek()? == b']' {
                        self.pos += 1;
                        return Some(Value::Array(items));
                    }
                    items.push(self.value()?);
                }
            }
            b'"' => {
                let start = self.pos;
                self.pos += 1;
                while self.pos < self.text.len() && self.text[self.pos] != b'"' {
                    if self.text[self.pos] == b'\\' {
                        self.pos += 1;
                    }
                    self.pos += 1;
                }
                self.pos += 1;
                serde_json::from_slice(self.text.get(start..self.pos)?).ok()
            }
            b'-' | b'0'..=b'9' => {
                let start = self.pos;
                while self.pos < self.text.len()
                    && matches!(
                        self.text[self.pos],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.pos += 1;
                }
                serde_json::from_slice(&self.text[start..self.pos]).ok()
            }
            _ => {
                let name = self.name()?;
                Some(match name.as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    "null" => Value::Null,
                    _ => Value::String(name),
                })
            }
        }
    }
}
