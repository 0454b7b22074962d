//! The WebSocket protocol: one JSON object per text frame, with a `type`.
//!
//! client → server: `join {channel}`, `leave {channel}`, `send {channel, client_msg_id, body}`,
//! `ping`. server → client: `message {channel, id, sender, body, ts}`, `ack {client_msg_id,
//! id}`, `presence {channel, user, state}`, `joined {channel}`, `left {channel}`, `pong`,
//! `error {code, message, ref?}`. Ids are decimal strings; `ts` is RFC 3339 UTC.

use loadlab_kit::Id;
use serde::{Deserialize, Serialize};

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// Start receiving a channel's messages (and become a member).
    Join {
        /// Channel id.
        channel: Id,
    },
    /// Stop receiving a channel's messages on this connection.
    Leave {
        /// Channel id.
        channel: Id,
    },
    /// Send a message to a joined channel; acked once durable.
    Send {
        /// Channel id.
        channel: Id,
        /// The client's id for this message (1–64 characters); a retry with the same id is
        /// acked with the original message id instead of being sent twice.
        client_msg_id: String,
        /// Text.
        body: String,
        /// Optional W3C `traceparent` of the client's span: the gateway's handling joins that
        /// trace (load generators send it for sampled messages).
        #[serde(default)]
        traceparent: Option<String>,
    },
    /// Keep-alive; answered with `pong`.
    Ping,
}

/// A frame to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// A message in a joined channel.
    Message {
        /// Channel id.
        channel: Id,
        /// Message id.
        id: Id,
        /// Sender's user id.
        sender: Id,
        /// Text.
        body: &'a str,
        /// When it became durable.
        ts: &'a str,
    },
    /// The message with `client_msg_id` is durable as `id`.
    Ack {
        /// The client's id.
        client_msg_id: &'a str,
        /// Message id.
        id: Id,
    },
    /// A channel member came online or went offline.
    Presence {
        /// Channel id.
        channel: Id,
        /// User id.
        user: Id,
        /// `online` or `offline`.
        state: &'a str,
    },
    /// The join of `channel` took effect.
    Joined {
        /// Channel id.
        channel: Id,
    },
    /// The leave of `channel` took effect.
    Left {
        /// Channel id.
        channel: Id,
    },
    /// Answer to `ping`.
    Pong,
    /// Something the client sent was refused; `ref` names the `client_msg_id` it concerns.
    Error {
        /// Stable code.
        code: &'a str,
        /// Explanation.
        message: &'a str,
        /// The `client_msg_id` of the refused send, when there is one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// WebSocket close codes the gateway uses.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down (drain on SIGTERM); reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame exceeded `--max-frame-bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Protocol violation.
    pub const PROTOCOL: u16 = 1002;
    /// Nothing received for `--idle-timeout`.
    pub const IDLE_TIMEOUT: u16 = 4002;
    /// The client did not read fast enough; its outbound queue filled up.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Error codes of `error` frames.
pub mod code {
    /// Not JSON, or not an object.
    pub const MALFORMED: &str = "malformed_frame";
    /// A `type` the gateway does not know.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// Known type, wrong or missing fields.
    pub const INVALID: &str = "invalid_frame";
    /// Binary frames are not part of the protocol.
    pub const BINARY: &str = "binary_not_supported";
    /// Sending to a channel the connection has not joined.
    pub const NOT_JOINED: &str = "not_joined";
    /// The channel does not exist.
    pub const UNKNOWN_CHANNEL: &str = "unknown_channel";
    /// The body is over `--max-message-bytes`.
    pub const TOO_LARGE: &str = "message_too_large";
    /// Empty body or bad `client_msg_id`.
    pub const INVALID_MESSAGE: &str = "invalid_message";
    /// Over the per-connection send rate.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// Over `--max-channels-per-connection`.
    pub const TOO_MANY_CHANNELS: &str = "too_many_channels";
    /// The message could not be made durable (database unavailable): it was NOT sent.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The gateway's commit queue is full: retry later.
    pub const OVERLOADED: &str = "overloaded";
}

/// Classifies a frame that did not parse into an error code and a message.
pub fn parse_error(text: &str, e: &serde_json::Error) -> (&'static str, String) {
    let detail = e.to_string();
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(_) => (code::MALFORMED, format!("not JSON: {detail}")),
        Ok(v) if !v.is_object() => (code::MALFORMED, "a frame is one JSON object".into()),
        Ok(v) => match v.get("type").and_then(|t| t.as_str()) {
            None => (code::INVALID, "missing `type`".into()),
            Some(t) if !["join", "leave", "send", "ping"].contains(&t) => (
                code::UNKNOWN_TYPE,
                format!("unknown type {t:?}; expected join, leave, send or ping"),
            ),
            Some(_) => (code::INVALID, detail),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_and_render() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"send","channel":"12","client_msg_id":"a-1","body":"hi"}"#,
        )
        .expect("send");
        assert_eq!(
            f,
            ClientFrame::Send {
                channel: Id(12),
                client_msg_id: "a-1".into(),
                body: "hi".into(),
                traceparent: None,
            }
        );
        assert_eq!(
            serde_json::from_str::<ClientFrame>(r#"{"type":"ping"}"#).expect("ping"),
            ClientFrame::Ping
        );
        let json = ServerFrame::Error {
            code: code::NOT_JOINED,
            message: "join first",
            reference: Some("x"),
        }
        .to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"not_joined","message":"join first","ref":"x"}"#
        );
        let json = ServerFrame::Ack {
            client_msg_id: "a-1",
            id: Id(99),
        }
        .to_json();
        assert_eq!(json, r#"{"type":"ack","client_msg_id":"a-1","id":"99"}"#);
    }

    #[test]
    fn parse_errors_are_classified() {
        for (text, expected) in [
            ("not json", code::MALFORMED),
            ("[1]", code::MALFORMED),
            (r#"{"channel":"1"}"#, code::INVALID),
            (r#"{"type":"shout"}"#, code::UNKNOWN_TYPE),
            (r#"{"type":"join"}"#, code::INVALID),
            (r#"{"type":"join","channel":"x"}"#, code::INVALID),
            (r#"{"type":"join","channel":"1","extra":1}"#, code::INVALID),
        ] {
            let e = serde_json::from_str::<ClientFrame>(text).expect_err(text);
            assert_eq!(parse_error(text, &e).0, expected, "{text}");
        }
    }
}
