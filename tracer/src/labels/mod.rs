// TEMPORARY STUB (not committed): replaced by the parsers' branch.
#![allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Postgres,
    Redis,
}
impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
            Protocol::Redis => "redis",
        }
    }
}
pub fn detect(first: &[u8]) -> Option<Protocol> {
    first.starts_with(b"GET ").then_some(Protocol::Http)
}
#[derive(Default, Debug, Clone)]
pub struct Routes;
impl Routes {
    pub fn parse(_p: &[String]) -> anyhow::Result<Routes> {
        Ok(Routes)
    }
}
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Responses {
    pub statuses: Vec<u16>,
    pub errors: u32,
}
pub struct Decoder(Protocol);
impl Decoder {
    pub fn new(p: Protocol) -> Self {
        Decoder(p)
    }
    pub fn protocol(&self) -> Protocol {
        self.0
    }
    pub fn requests(&mut self, bytes: &[u8], _whole: bool, _r: &Routes) -> Vec<String> {
        let s = String::from_utf8_lossy(bytes);
        s.lines().next().map(|l| l.rsplit_once(' ').map_or(l, |x| x.0).to_string()).into_iter().collect()
    }
    pub fn responses(&mut self, bytes: &[u8]) -> Responses {
        Responses {
            statuses: std::str::from_utf8(&bytes[9.min(bytes.len())..12.min(bytes.len())])
                .ok()
                .and_then(|s| s.parse().ok())
                .into_iter()
                .collect(),
            errors: 0,
        }
    }
}
pub fn sanitize(raw: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(max)]).into_owned()
}
pub const MAX_LABEL: usize = 96;
