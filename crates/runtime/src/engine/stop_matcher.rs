//! Stop strings: text that might be the start of one is held back until it is clear.

/// Holds back streamed text that might be the start of a stop string.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Final text not yet handed out.
    pending: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds decoded text; returns (text safe to emit, whether a stop string was hit).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out.push_str(&emit);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_cut() {
        assert_eq!(run(&["</end>"], &["hello </e", "nd> more"]), ("hello ".to_string(), true));
    }

    #[test]
    fn text_that_only_looks_like_a_stop_prefix_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "ART"]), ("START".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbba"]), ("xx".to_string(), true));
    }

    #[test]
    fn multibyte_stop_strings_are_cut_on_char_boundaries() {
        assert_eq!(run(&["。结束"], &["你好。", "结", "束了"]), ("你好".to_string(), true));
    }
}
