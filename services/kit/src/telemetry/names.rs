//! Span names and attribute values that repeat on every traced request — route templates, gRPC
//! method names, peer hosts — as `&'static str`, so a sampled request does not allocate (and the
//! export thread free) a copy of each for every span. Only for low-cardinality strings: the set
//! is bounded by [`MAX_NAMES`], and past it strings are copied as before.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{OnceLock, RwLock};

/// Most distinct strings kept (each is leaked once, a few dozen bytes: a bounded cost).
pub const MAX_NAMES: usize = 4096;

static NAMES: OnceLock<RwLock<HashSet<&'static str>>> = OnceLock::new();

/// `s` as a static string once it has been seen, or a copy when the set is full.
pub fn name(s: &str) -> Cow<'static, str> {
    let names = NAMES.get_or_init(|| RwLock::new(HashSet::new()));
    if let Some(known) = names
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(s)
    {
        return Cow::Borrowed(known);
    }
    let mut all = names
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = all.get(s) {
        return Cow::Borrowed(known);
    }
    if all.len() >= MAX_NAMES {
        return Cow::Owned(s.to_owned());
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    all.insert(leaked);
    Cow::Borrowed(leaked)
}

/// An attribute value from [`name`].
pub fn value(s: &str) -> opentelemetry::Value {
    opentelemetry::Value::from(name(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_kept_once_and_the_set_is_bounded() {
        let a = name("GET /v1/names-test/{id}");
        let b = name(&String::from("GET /v1/names-test/{id}"));
        let (Cow::Borrowed(a), Cow::Borrowed(b)) = (a, b) else {
            panic!("a known name is borrowed");
        };
        assert!(std::ptr::eq(a, b), "both are the one kept copy");
        // Fill the set: past the bound, names are copies and the set stops growing.
        for i in 0..MAX_NAMES {
            let _ = name(&format!("names-test-fill-{i}"));
        }
        let full = NAMES
            .get()
            .expect("initialised")
            .read()
            .expect("not poisoned")
            .len();
        assert_eq!(full, MAX_NAMES);
        assert!(matches!(name("names-test-one-too-many"), Cow::Owned(_)));
        assert_eq!(name("names-test-one-too-many"), "names-test-one-too-many");
        assert!(matches!(
            value("names-test-fill-0"),
            opentelemetry::Value::String(_)
        ));
    }
}
