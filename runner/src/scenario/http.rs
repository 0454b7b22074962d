//! The `http` scenario: declarative requests picked by weight, with templated URLs, headers and
//! bodies, and checks — for any HTTP target.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::executor::Iteration;
use crate::http_client::{Client, Request, VuConnection};
use crate::metrics::{EndpointId, Recorder, Registry};
use crate::scenario::send_recorded;
use crate::spec::{ChecksSpec, HttpRequestSpec, HttpScenario};

/// A request template, validated once.
struct Template {
    endpoint: EndpointId,
    method: Method,
    url: String,
    headers: Vec<(HeaderName, String)>,
    body: Option<String>,
    weight: u32,
    checks: ChecksSpec,
    /// Whether any part needs substitution (most don't: skip the work).
    templated: bool,
}

/// A template that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("scenario.http.requests[{index}].{field}: {message}")]
pub struct TemplateError {
    index: usize,
    field: &'static str,
    message: String,
}

/// The `http` scenario.
pub struct HttpWorkload {
    client: Client,
    templates: Vec<Template>,
    total_weight: u32,
    iterations: AtomicU64,
}

/// Per-VU state.
pub struct HttpVu {
    conn: VuConnection,
    recorder: Recorder,
    rng: SmallRng,
    id: u64,
}

impl HttpWorkload {
    /// Validates the requests and interns their endpoints.
    pub fn new(
        spec: &HttpScenario,
        client: Client,
        registry: &Registry,
    ) -> Result<Arc<HttpWorkload>, TemplateError> {
        let mut templates = Vec::with_capacity(spec.requests.len());
        for (index, r) in spec.requests.iter().enumerate() {
            templates.push(Template::new(index, r, registry)?);
        }
        let total_weight = templates.iter().map(|t| t.weight).sum();
        Ok(Arc::new(HttpWorkload {
            client,
            templates,
            total_weight,
            iterations: AtomicU64::new(0),
        }))
    }
}

fn is_templated(s: &str) -> bool {
    s.contains("{{")
}

impl Template {
    fn new(
        index: usize,
        r: &HttpRequestSpec,
        registry: &Registry,
    ) -> Result<Template, TemplateError> {
        let err = |field: &'static str, message: String| TemplateError {
            index,
            field,
            message,
        };
        let method =
            Method::from_bytes(r.method.as_bytes()).map_err(|e| err("method", e.to_string()))?;
        // Validate a rendering of the URL now, so a typo fails before the run starts.
        render(&r.url, 0, 0, 0)
            .parse::<Uri>()
            .map_err(|e| err("url", format!("{:?}: {e}", r.url)))?;
        let mut headers = Vec::with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| err("headers", format!("{name:?}: {e}")))?;
            HeaderValue::from_str(&render(value, 0, 0, 0))
                .map_err(|e| err("headers", format!("{value:?}: {e}")))?;
            headers.push((name, value.clone()));
        }
        let templated = is_templated(&r.url)
            || r.headers.values().any(|v| is_templated(v))
            || r.body.as_deref().is_some_and(is_templated);
        Ok(Template {
            endpoint: registry.endpoint(&format!("{} {}", method, r.name)),
            method,
            url: r.url.clone(),
            headers,
            body: r.body.clone(),
            weight: r.weight,
            checks: r.checks.clone(),
            templated,
        })
    }

    fn request(&self, vu: u64, iter: u64, random: u64) -> Option<Request> {
        let text = |s: &str| {
            if self.templated {
                render(s, vu, iter, random)
            } else {
                s.to_owned()
            }
        };
        let uri = text(&self.url).parse::<Uri>().ok()?;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers.insert(name.clone(), HeaderValue::from_str(&text(value)).ok()?);
        }
        let body = self
            .body
            .as_deref()
            .map_or_else(Bytes::new, |b| Bytes::from(text(b)));
        Some(Request {
            method: self.method.clone(),
            uri,
            headers,
            body,
        })
    }
}

/// Substitutes `{{vu}}`, `{{iter}}`, `{{random}}` (a random u64) and `{{uuid}}` (random v4).
pub fn render(template: &str, vu: u64, iter: u64, random: u64) -> String {
    if !is_templated(template) {
        return template.to_owned();
    }
    let uuid = {
        let hi = random.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            (random >> 32) as u32,
            (random >> 16) as u16,
            (random & 0xfff) as u16,
            0x8000 | ((hi >> 48) as u16 & 0x3fff),
            hi & 0xffff_ffff_ffff
        )
    };
    template
        .replace("{{vu}}", &vu.to_string())
        .replace("{{iter}}", &iter.to_string())
        .replace("{{random}}", &random.to_string())
        .replace("{{uuid}}", &uuid)
}

#[async_trait]
impl Iteration for HttpWorkload {
    type Vu = HttpVu;

    fn new_vu(&self, id: u64, recorder: Recorder) -> HttpVu {
        HttpVu {
            conn: self.client.connection(),
            recorder,
            rng: SmallRng::seed_from_u64(id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed),
            id,
        }
    }

    async fn run(&self, vu: &mut HttpVu, queued: Duration) {
        let iter = self.iterations.fetch_add(1, Ordering::Relaxed);
        let mut pick = vu.rng.random_range(0..self.total_weight.max(1));
        let template = self
            .templates
            .iter()
            .find(|t| {
                if pick < t.weight {
                    true
                } else {
                    pick -= t.weight;
                    false
                }
            })
            .unwrap_or(&self.templates[0]);
        let random: u64 = vu.rng.random();
        let Some(request) = template.request(vu.id, iter, random) else {
            vu.recorder.check(false);
            return;
        };
        let response = send_recorded(
            &mut vu.conn,
            &vu.recorder,
            template.endpoint,
            request,
            queued,
        )
        .await;
        let checks = &template.checks;
        if checks.status.is_none()
            && checks.body_contains.is_none()
            && checks.max_duration.is_none()
        {
            return;
        }
        let passed = match &response {
            Ok(r) => {
                checks.status.is_none_or(|s| s == r.status)
                    && checks
                        .body_contains
                        .as_deref()
                        .is_none_or(|needle| memmem(&r.body, needle.as_bytes()))
                    && checks
                        .max_duration
                        .is_none_or(|max| r.timings.duration + queued <= max)
            }
            Err(_) => false,
        };
        vu.recorder.check(passed);
    }
}

fn memmem(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render() {
        assert_eq!(render("/a/{{vu}}/{{iter}}", 3, 7, 0), "/a/3/7");
        assert_eq!(render("plain", 1, 2, 3), "plain");
        let id = render("{{uuid}}", 0, 0, 0xdead_beef_0123_4567);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(memmem(b"hello world", b"o w"));
        assert!(!memmem(b"hello", b"world"));
    }
}
