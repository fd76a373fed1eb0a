//! Token counts from an LLM API's response, read as the body streams past: the `usage` object
//! of a JSON answer, or of the server-sent events of a streamed one (OpenAI's chat completions
//! and Responses API, Anthropic's Messages API and Gemini spell it in their own places and
//! words).
use std::sync::Arc;

use http::{header, HeaderMap};
use serde::de::{Deserializer, MapAccess, Visitor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::jsonkey::{Key, Skip};

/// The most of a JSON answer, or of one event's data or line, kept to be read.
const MAX: usize = 1 << 20;

/// Input and output tokens, as far as the response said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: Option<u64>,
    pub output: Option<u64>,
}

impl Tokens {
    /// Their sum, whatever was said of either.
    pub fn total(self) -> u64 {
        self.input
            .unwrap_or(0)
            .saturating_add(self.output.unwrap_or(0))
    }

    /// Takes what one `usage` object says; counts that grow as a stream goes keep the largest
    /// seen.
    fn merge(&mut self, usage: &Counts) {
        let sum =
            |counts: &[Option<u64>]| counts.iter().flatten().copied().reduce(u64::saturating_add);
        // OpenAI: prompt/completion (reasoning included); Anthropic: input (cache reads and
        // writes counted apart), output; Gemini: prompt, candidates and thoughts.
        let input = sum(&[usage.prompt_tokens, usage.prompt_token_count]).or_else(|| {
            sum(&[
                usage.input_tokens,
                usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens,
            ])
        });
        let output = usage
            .completion_tokens
            .or(usage.output_tokens)
            .or_else(|| sum(&[usage.candidates_token_count, usage.thoughts_token_count]));
        self.input = self.input.max(input);
        self.output = self.output.max(output);
    }

    /// Reads the usage objects of one answer or event: `usage` at the top (chat completions,
    /// Anthropic's `message_delta`), inside `response` (Responses API) or `message`
    /// (Anthropic's `message_start`), or Gemini's `usageMetadata`. Everything else is skipped
    /// as it is parsed, not kept; a key given twice counts as its last value, and what is not
    /// an object (or, for a count, a non-negative number) counts as absent.
    fn read(&mut self, json: &[u8]) {
        let mut de = serde_json::Deserializer::from_slice(json);
        let Ok(found) = de.deserialize_any(Answer) else {
            return;
        };
        if de.end().is_err() {
            return;
        }
        for usage in found.into_iter().flatten() {
            self.merge(&usage);
        }
    }
}

/// The counts one `usage` object gives, by the keys each API uses.
#[derive(Debug, Default)]
struct Counts {
    prompt_tokens: Option<u64>,
    prompt_token_count: Option<u64>,
    input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
}

/// An answer's (or event's) usage objects: `usage`, `response.usage`, `message.usage`,
/// `usageMetadata`.
struct Answer;

impl<'de> Visitor<'de> for Answer {
    type Value = [Option<Counts>; 4];

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Option<Counts>; 4] = Default::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match &*key {
                "usage" => found[0] = map.next_value::<Usage>()?.0,
                "response" => found[1] = map.next_value::<Holder>()?.0,
                "message" => found[2] = map.next_value::<Holder>()?.0,
                "usageMetadata" => found[3] = map.next_value::<Usage>()?.0,
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(found)
    }
}

/// Any JSON value; the usage object inside it, if it is an object with one.
struct Holder(Option<Counts>);

impl<'de> serde::Deserialize<'de> for Holder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Holder;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Holder, A::Error> {
                let mut usage = None;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if &*key == "usage" {
                        usage = map.next_value::<Usage>()?.0;
                    } else {
                        map.next_value::<Skip>()?;
                    }
                }
                Ok(Holder(usage))
            }

            crate::jsonkey::absent_unless_map!(Holder(None));
            crate::jsonkey::absent_numbers!(Holder(None));
        }
        d.deserialize_any(V)
    }
}

/// Any JSON value; its counts, if it is an object.
struct Usage(Option<Counts>);

impl<'de> serde::Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Usage;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Usage, A::Error> {
                let mut c = Counts::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let slot = match &*key {
                        "prompt_tokens" => &mut c.prompt_tokens,
                        "promptTokenCount" => &mut c.prompt_token_count,
                        "input_tokens" => &mut c.input_tokens,
                        "cache_creation_input_tokens" => &mut c.cache_creation_input_tokens,
                        "cache_read_input_tokens" => &mut c.cache_read_input_tokens,
                        "completion_tokens" => &mut c.completion_tokens,
                        "output_tokens" => &mut c.output_tokens,
                        "candidatesTokenCount" => &mut c.candidates_token_count,
                        "thoughtsTokenCount" => &mut c.thoughts_token_count,
                        _ => {
                            map.next_value::<Skip>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<Count>()?.0;
                }
                Ok(Usage(Some(c)))
            }

            crate::jsonkey::absent_unless_map!(Usage(None));
            crate::jsonkey::absent_numbers!(Usage(None));
        }
        d.deserialize_any(V)
    }
}

/// Any JSON value; a count if it is a non-negative number (a fraction rounded down).
struct Count(Option<u64>);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }

            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }

            fn visit_f64<E>(self, v: f64) -> Result<Count, E> {
                // Saturating, as a float-to-integer cast is.
                Ok(Count((v >= 0.0).then_some(v as u64)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<Key<'de>, Skip>()?.is_some() {}
                Ok(Count(None))
            }

            crate::jsonkey::absent_unless_map!(Count(None));
        }
        d.deserialize_any(V)
    }
}

/// The gateway's memory for bodies read for their model and answers read for their token
/// counts, in KiB: all of it, and each workload's share (by [`WorkloadId::holder`]), so
/// that one workload cannot take it all from the others.
///
/// [`WorkloadId::holder`]: crate::identity::WorkloadId::holder
#[derive(Debug)]
pub struct Rooms {
    all: Arc<Semaphore>,
    share: usize,
    workloads: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

impl Rooms {
    /// `all` KiB in all, at most `share` KiB of it to one workload.
    pub fn new(all: usize, share: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(all)),
            share,
            workloads: std::sync::Mutex::default(),
        }
    }

    /// The room for the workload `holder`.
    pub fn of(&self, holder: &str) -> Room {
        let mut workloads = self
            .workloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if workloads.len() >= 1024 {
            // Shares nobody holds are whole again: forget them.
            workloads.retain(|_, share| Arc::strong_count(share) > 1);
        }
        let mine = workloads
            .entry(holder.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)));
        Room {
            all: Arc::clone(&self.all),
            mine: Arc::clone(mine),
        }
    }

    /// KiB not in use, in all.
    pub fn available(&self) -> usize {
        self.all.available_permits()
    }
}

/// One workload's way into the [`Rooms`].
#[derive(Debug, Clone)]
pub struct Room {
    all: Arc<Semaphore>,
    mine: Arc<Semaphore>,
}

/// What a [`RoomBuf`] holds of its [`Room`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    all: OwnedSemaphorePermit,
    _mine: OwnedSemaphorePermit,
}

/// A buffer whose memory comes from a [`Room`], taken as it grows and given back when it is
/// dropped or released.
#[derive(Debug)]
pub struct RoomBuf {
    buf: Vec<u8>,
    max: usize,
    room: Room,
    held: Vec<Held>,
}

/// Why a [`RoomBuf`] did not take more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Past its most.
    TooLarge,
    /// The room has no more.
    NoRoom,
}

impl RoomBuf {
    pub fn new(room: &Room, max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            room: room.clone(),
            held: Vec::new(),
        }
    }

    /// Appends `data`, growing within the buffer's most and the room.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Full> {
        let need = self.buf.len() + data.len();
        if need > self.max {
            return Err(Full::TooLarge);
        }
        if need > self.buf.capacity() {
            let capacity = need
                .max(self.buf.capacity() * 2)
                .clamp(4096, self.max.max(4096));
            let kib = capacity.div_ceil(1024);
            let have: usize = self.held.iter().map(|h| h.all.num_permits()).sum();
            if kib > have {
                let more = u32::try_from(kib - have).unwrap_or(u32::MAX);
                // The workload's share first, then the whole: either full, nothing is kept.
                let Ok(mine) = Arc::clone(&self.room.mine).try_acquire_many_owned(more) else {
                    return Err(Full::NoRoom);
                };
                let Ok(all) = Arc::clone(&self.room.all).try_acquire_many_owned(more) else {
                    return Err(Full::NoRoom);
                };
                self.held.push(Held { all, _mine: mine });
            }
            self.buf.reserve_exact(capacity - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// Gives the memory back.
    pub fn release(&mut self) {
        self.buf = Vec::new();
        self.held = Vec::new();
    }

    /// The bytes, and the room they hold until the permit is dropped.
    pub fn into_parts(self) -> (Vec<u8>, Vec<Held>) {
        (self.buf, self.held)
    }
}

/// Reads a response body's token counts as its bytes pass.
#[derive(Debug)]
pub struct UsageReader {
    events: bool,
    /// The JSON answer so far; in an event stream, the line not yet ended.
    buf: RoomBuf,
    /// In an event stream, the data of the event not yet dispatched: its `data` lines, each
    /// followed by a newline.
    data: RoomBuf,
    /// The answer, or the current line, went past [`MAX`] or past the room there was: not
    /// read.
    skipping: bool,
    /// The current event's data went past [`MAX`] or the room: not read.
    skipping_event: bool,
    /// The last byte fed ended a line with a CR: an LF that comes next belongs to it.
    after_cr: bool,
    /// No line has ended yet (the stream's first may begin with a byte order mark).
    first_line: bool,
    tokens: Tokens,
}

impl UsageReader {
    /// A reader for a response with these headers (JSON or an event stream, not encoded),
    /// whose buffers take their memory from `room`.
    pub fn for_response(headers: &HeaderMap, room: &Room) -> Option<Self> {
        if crate::http_proxy::encoded(headers) {
            return None;
        }
        let kind = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let events = kind
            .split(';')
            .next()?
            .trim()
            .eq_ignore_ascii_case("text/event-stream");
        if !events && !crate::http_proxy::is_json(headers) {
            return None;
        }
        Some(Self {
            events,
            buf: RoomBuf::new(room, MAX),
            data: RoomBuf::new(room, MAX),
            skipping: false,
            skipping_event: false,
            after_cr: false,
            first_line: true,
            tokens: Tokens::default(),
        })
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        if !self.events {
            if !self.skipping && self.buf.push(data).is_err() {
                self.skipping = true;
                self.buf.release();
            }
            return;
        }
        // Lines end with CRLF, LF or CR (the event stream format allows each).
        if data.is_empty() {
            return;
        }
        if std::mem::take(&mut self.after_cr) {
            data = data.strip_prefix(b"\n").unwrap_or(data);
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', data) {
            let (line, rest) = data.split_at(end);
            data = match rest {
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [b'\r', b'\n', rest @ ..] | [_, rest @ ..] => rest,
                [] => &[],
            };
            self.end_line(line);
        }
        if !self.skipping && !data.is_empty() && self.buf.push(data).is_err() {
            self.buf.release();
            self.skipping = true;
        }
    }

    /// A line has ended with `tail` (after what [`UsageReader::buf`] holds of it).
    fn end_line(&mut self, tail: &[u8]) {
        if std::mem::take(&mut self.skipping) {
            // Too long to keep: if it was data, its event is incomplete.
            self.buf.release();
            self.skipping_event = true;
            return;
        }
        if !self.buf.is_empty() && self.buf.push(tail).is_err() {
            self.buf.release();
            self.skipping_event = true;
            return;
        }
        let line = if self.buf.is_empty() {
            tail
        } else {
            self.buf.as_slice()
        };
        let line = if std::mem::take(&mut self.first_line) {
            line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line)
        } else {
            line
        };
        match line {
            // A blank line dispatches the event.
            [] => {
                if !std::mem::take(&mut self.skipping_event) {
                    let json = self.data.as_slice().trim_ascii();
                    if json.first() == Some(&b'{') {
                        self.tokens.read(json);
                    }
                }
                self.data.release();
            }
            _ => {
                let (field, value) = match memchr::memchr(b':', line) {
                    Some(i) => (&line[..i], &line[i + 1..]),
                    None => (line, &[][..]),
                };
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if field == b"data"
                    && !self.skipping_event
                    && (self.data.push(value).is_err() || self.data.push(b"\n").is_err())
                {
                    self.data.release();
                    self.skipping_event = true;
                }
            }
        }
        // Room is held only while a line, or an event, is being put together.
        self.buf.release();
    }

    /// The counts, once the body has ended (a last line or event not ended is read too).
    pub fn finish(mut self) -> Tokens {
        if !self.events {
            if !self.skipping {
                self.tokens.read(self.buf.as_slice());
            }
            return self.tokens;
        }
        if self.skipping || !self.buf.is_empty() {
            self.end_line(&[]);
        }
        self.end_line(&[]);
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Room {
        Rooms::new(4 * 1024, 4 * 1024).of("a")
    }

    fn reader(content_type: &str) -> Option<UsageReader> {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_str(content_type).expect("value"),
        );
        UsageReader::for_response(&h, &room())
    }

    /// Feeds `body` cut every `step` bytes.
    fn read(content_type: &str, body: &str, step: usize) -> Tokens {
        let mut r = reader(content_type).expect("a reader");
        for chunk in body.as_bytes().chunks(step) {
            r.feed(chunk);
        }
        r.finish()
    }

    fn tokens(input: u64, output: u64) -> Tokens {
        Tokens {
            input: Some(input),
            output: Some(output),
        }
    }

    #[test]
    fn json_answers_of_each_api() {
        let chat = r#"{"id":"c","choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":1}"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let responses = r#"{"id":"r","output":[],"usage":{"input_tokens":7,"output_tokens":9}}"#;
        let anthropic =
            r#"{"type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":4}}"#;
        for step in [1, 5, 4096] {
            assert_eq!(
                read("application/json", chat, step),
                tokens(12, 30),
                "{step}"
            );
            assert_eq!(
                read("application/json; charset=utf-8", responses, step),
                tokens(7, 9)
            );
            assert_eq!(read("Application/JSON", anthropic, step), tokens(3, 4));
        }
        // Anthropic counts cache reads and writes apart from input_tokens: all are input.
        let cached = r#"{"usage":{"input_tokens":10,"cache_creation_input_tokens":2000,"cache_read_input_tokens":98000,"output_tokens":5}}"#;
        assert_eq!(read("application/json", cached, 4096), tokens(100_010, 5));
        let gemini = r#"{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":20,"thoughtsTokenCount":300}}"#;
        assert_eq!(read("application/json", gemini, 4096), tokens(8, 320));
        // A float count, and a `message` that is a string, do not hide the usage.
        let odd = r#"{"message":"hello","usage":{"prompt_tokens":3.0,"completion_tokens":4}}"#;
        assert_eq!(read("application/json", odd, 4096), tokens(3, 4));
        assert_eq!(
            read("application/json", r#"{"error":"x"}"#, 3),
            Tokens::default()
        );
        assert_eq!(read("application/json", "not json", 3), Tokens::default());
        // Read as a JSON value would be: a key given twice is its last value; a count that is
        // not a non-negative number, and a usage that is not an object, are absent; a
        // fraction is rounded down and a count past u64 saturates.
        for (answer, want) in [
            (
                r#"{"usage":{"prompt_tokens":1,"prompt_tokens":5,"completion_tokens":2}}"#,
                (Some(5), Some(2)),
            ),
            (
                r#"{"usage":{"prompt_tokens":9},"usage":"none","response":{"usage":{"input_tokens":4}}}"#,
                (Some(4), None),
            ),
            (
                r#"{"usage":{"prompt_tokens":"9","completion_tokens":-2,"output_tokens":[1]}}"#,
                (None, None),
            ),
            (
                r#"{"usage":{"prompt_tokens":2.9,"completion_tokens":1e30}}"#,
                (Some(2), Some(u64::MAX)),
            ),
            (
                r#"{"message":{"id":"m","usage":{"input_tokens":6,"output_tokens":1}},"x":[{"usage":{"input_tokens":99}}]}"#,
                (Some(6), Some(1)),
            ),
            (r#"[{"usage":{"prompt_tokens":1}}]"#, (None, None)),
            (r#"{"usage":{"prompt_tokens":1}} trailing"#, (None, None)),
            (
                r#"{"us\u0061ge":{"prompt_tokens":7,"completion_tokens":null}}"#,
                (Some(7), None),
            ),
            // What a JSON value refuses anywhere in the answer (a lone surrogate, a number
            // out of range) leaves the answer unread, though the rest is skipped unkept.
            (
                r#"{"choices":[{"message":{"content":"\ud800"}}],"usage":{"prompt_tokens":5}}"#,
                (None, None),
            ),
            (
                r#"{"x":{"y":1e400},"usage":{"prompt_tokens":5}}"#,
                (None, None),
            ),
        ] {
            let got = read("application/json", answer, 4096);
            assert_eq!((got.input, got.output), want, "{answer}");
        }
        // Nesting past serde_json's limit likewise.
        let deep = format!(
            r#"{{"x":{}{},"usage":{{"prompt_tokens":5}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(read("application/json", &deep, 4096), Tokens::default());
        let shallow = deep
            .replace(&"[".repeat(200), "[[")
            .replace(&"]".repeat(200), "]]");
        assert_eq!(read("application/json", &shallow, 4096).input, Some(5));
    }

    #[test]
    fn event_streams_of_each_api() {
        let chat = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":13}}}\n\n";
        let anthropic = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\nevent: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        for step in [1, 7, 4096] {
            assert_eq!(
                read("text/event-stream", chat, step),
                tokens(5, 2),
                "{step}"
            );
            assert_eq!(read("text/event-stream", responses, step), tokens(11, 13));
            assert_eq!(read("text/event-stream", anthropic, step), tokens(25, 15));
        }
        // The last line without its newline is still read.
        let unended = "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
        assert_eq!(read("text/event-stream", unended, 4), tokens(1, 2));
    }

    #[test]
    fn events_are_put_together_as_the_format_says() {
        // An event's data over several lines, joined by newlines; comments and other fields
        // between them; lines ended by CR alone, by CRLF and by LF.
        let split = "event: message_delta\ndata: {\"type\":\"message_delta\",\n: a comment\ndata:\"usage\":{\"output_tokens\":15,\nid: 7\ndata: \"input_tokens\":3}}\n\n";
        for ending in ["\n", "\r", "\r\n"] {
            let body = split.replace('\n', ending);
            for step in [1, 2, 3, 5, 4096] {
                assert_eq!(
                    read("text/event-stream", &body, step),
                    tokens(3, 15),
                    "{ending:?} {step}"
                );
            }
        }
        // A byte order mark before the first line; an empty chunk between a CR and its LF.
        let marked = format!("\u{feff}{split}").replace('\n', "\r\n");
        assert_eq!(read("text/event-stream", &marked, 1), tokens(3, 15));
        let mut r = reader("text/event-stream").expect("reader");
        for chunk in marked.as_bytes().split_inclusive(|&b| b == b'\r') {
            r.feed(chunk);
            r.feed(b"");
        }
        assert_eq!(r.finish(), tokens(3, 15));
        // A data line past the most leaves its event unread; the next event is read.
        let long = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":9}},\ndata: \"pad\":\"{}\"}}\n\ndata: {{\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}\n\n",
            "x".repeat(MAX)
        );
        assert_eq!(read("text/event-stream", &long, 65536), tokens(1, 2));
        // Lines of one event are not read one by one: a part that looks whole is not an event.
        let partial =
            "data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":4}}\ndata: ,\"x\":1}\n\n";
        assert_eq!(read("text/event-stream", partial, 4096), Tokens::default());
    }

    #[test]
    fn too_large_is_unread_and_other_types_are_not_read() {
        let big = format!(
            r#"{{"pad":"{}","usage":{{"prompt_tokens":1,"completion_tokens":1}}}}"#,
            "x".repeat(MAX)
        );
        assert_eq!(read("application/json", &big, 65536), Tokens::default());
        // One huge event line is skipped; the next one is read.
        let events = format!(
            "data: {{\"pad\":\"{}\"}}\n\ndata: {{\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}\n\n",
            "x".repeat(MAX)
        );
        assert_eq!(read("text/event-stream", &events, 65536), tokens(3, 4));
        assert!(reader("text/plain").is_none());
        let mut gz = HeaderMap::new();
        gz.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        gz.insert(
            header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        assert!(UsageReader::for_response(&gz, &room()).is_none());
    }

    #[test]
    fn one_workload_cannot_take_the_others_room() {
        let rooms = Rooms::new(64, 16);
        let (a, b) = (rooms.of("a"), rooms.of("b"));
        let mut first = RoomBuf::new(&a, 1 << 20);
        assert_eq!(first.push(&[0; 12 * 1024]), Ok(()));
        // Growing to 24 KiB would pass the workload's 16.
        assert_eq!(first.push(&[0; 12 * 1024]), Err(Full::NoRoom));
        let mut second = RoomBuf::new(&a, 1 << 20);
        assert_eq!(
            second.push(&[0; 8 * 1024]),
            Err(Full::NoRoom),
            "12 of 16 KiB in use"
        );
        assert_eq!(second.push(&[0; 4 * 1024]), Ok(()));
        let mut other = RoomBuf::new(&b, 1 << 20);
        assert_eq!(
            other.push(&[0; 16 * 1024]),
            Ok(()),
            "another workload has its own"
        );
        assert_eq!(rooms.available(), 64 - 12 - 4 - 16);
        assert_eq!(RoomBuf::new(&b, 10).push(&[0; 11]), Err(Full::TooLarge));
        drop((first, second, other));
        assert_eq!(rooms.available(), 64);
    }

    #[test]
    fn the_buffer_takes_its_memory_from_the_room_and_gives_it_back() {
        let rooms = Rooms::new(64, 64);
        let room = rooms.of("a");
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let mut r = UsageReader::for_response(&h, &room).expect("reader");
        r.feed(&[b' '; 10_000]);
        let held = 64 - rooms.available();
        assert!(
            (10..=16).contains(&held),
            "about the buffer's size in KiB: {held}"
        );
        // Past the room: the answer is not read, and the room is back.
        r.feed(&[b' '; 100_000]);
        assert_eq!(rooms.available(), 64);
        r.feed(b"{\"usage\":{\"prompt_tokens\":1}}");
        assert_eq!(r.finish(), Tokens::default());
        // An event stream keeps a line only while it is being read.
        h.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let mut r = UsageReader::for_response(&h, &room).expect("reader");
        r.feed(b"data: {\"usage\":{\"prompt_tokens\":2,");
        assert!(rooms.available() < 64);
        r.feed(b"\"completion_tokens\":3}}\n\n");
        assert_eq!(rooms.available(), 64, "given back once the line is read");
        assert_eq!(
            r.finish(),
            Tokens {
                input: Some(2),
                output: Some(3)
            }
        );
        assert_eq!(rooms.available(), 64);
    }
}
