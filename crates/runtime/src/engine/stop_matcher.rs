//! Stop strings: text that might be the start of one is held back until it is clear.

/// Holds back streamed text that might be the start of a stop string.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Whether the text that stops ends with the stop string (vLLM's `include_stop_str_in_output`).
    include_stop: bool,
    /// Final text not yet handed out.
    pending: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String], include_stop: bool) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop,
            pending: String::new(),
        }
    }

    /// Adds decoded text; returns (text safe to emit, whether a stop string was hit). With
    /// `may_stop` false (before `min_tokens`), nothing is looked for and nothing held back.
    pub(crate) fn push(&mut self, text: &str, may_stop: bool) -> (String, bool) {
        self.pending.push_str(text);
        if !may_stop {
            return (std::mem::take(&mut self.pending), false);
        }
        // The earliest match; of two at the same place, the longer.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|pos| (pos, std::cmp::Reverse(s.len()))))
            .min();
        if let Some((pos, std::cmp::Reverse(len))) = hit {
            let end = if self.include_stop { pos + len } else { pos };
            let out = self.pending[..end].to_string();
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
        run_with(stops, pieces, false, 0)
    }

    /// `include`: keep the stop string; `min`: pieces before stops are looked for.
    fn run_with(stops: &[&str], pieces: &[&str], include: bool, min: usize) -> (String, bool) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>(), include);
        let mut out = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let (emit, hit) = m.push(p, i + 1 >= min);
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
    fn include_stop_str_keeps_the_stop_string_and_drops_what_follows() {
        assert_eq!(run_with(&["</end>"], &["hello </e", "nd> more"], true, 0), ("hello </end>".to_string(), true));
        // Of two matches at the same place the longer is the one kept.
        assert_eq!(run_with(&["ab", "abc"], &["xabcd"], true, 0), ("xabc".to_string(), true));
    }

    #[test]
    fn stops_are_not_looked_for_before_min_tokens() {
        // The stop in the first two pieces passes; the one in the third stops.
        assert_eq!(run_with(&["x"], &["ax", "bx", "cxd"], false, 3), ("axbxc".to_string(), true));
        assert_eq!(run_with(&["x"], &["ax", "b"], false, 3), ("axb".to_string(), false));
    }

    #[test]
    fn multibyte_stop_strings_are_cut_on_char_boundaries() {
        assert_eq!(run(&["。结束"], &["你好。", "结", "束了"]), ("你好".to_string(), true));
    }
}
