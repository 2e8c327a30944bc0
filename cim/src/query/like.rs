//! LIKE patterns of WQL (`%`, `_`, `[a-z]`) and CQL (`.`, `*`, `[a-z]`, `\`), matched by
//! tracking the set of reachable pattern steps: at most (text length x pattern length) work,
//! never backtracking.

use super::{invalid, Language};
use crate::error::CimResult;

/// A LIKE pattern compiled into steps; matched by tracking the set of reachable steps, so a
/// match costs at most (text length × pattern length) and never backtracks.
#[derive(Debug, Clone)]
pub struct Pattern {
    steps: Vec<Step>,
}

#[derive(Debug, Clone)]
struct Step {
    atom: Atom,
    /// Zero or more (`%` in WQL, `x*` in CQL).
    repeat: bool,
}

#[derive(Debug, Clone)]
enum Atom {
    Any,
    Char(char),
    Set(Vec<(char, char)>, bool),
}

impl Atom {
    fn accepts(&self, c: char) -> bool {
        match self {
            Atom::Any => true,
            Atom::Char(x) => *x == c,
            Atom::Set(ranges, negated) => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

impl Pattern {
    /// Compiles a WQL (`%`, `_`, `[a-z]`) or CQL (`.`, `*`, `[a-z]`, `\`) pattern.
    pub fn compile(text: &str, language: Language) -> CimResult<Pattern> {
        let chars: Vec<char> = text.chars().collect();
        let mut steps: Vec<Step> = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            let atom = match (language, c) {
                (Language::Wql, '%') => {
                    steps.push(Step {
                        atom: Atom::Any,
                        repeat: true,
                    });
                    continue;
                }
                (Language::Wql, '_') | (Language::Cql, '.') => Atom::Any,
                (Language::Cql, '*') => {
                    match steps.last_mut() {
                        Some(last) if !last.repeat => last.repeat = true,
                        _ => return Err(invalid("'*' in a LIKE pattern must follow a character")),
                    }
                    continue;
                }
                (Language::Cql, '\\') => {
                    let e = *chars
                        .get(i)
                        .ok_or_else(|| invalid("pattern ends with '\\'"))?;
                    i += 1;
                    Atom::Char(e)
                }
                (_, '[') => {
                    let mut ranges = Vec::new();
                    let negated = chars.get(i) == Some(&'^');
                    if negated {
                        i += 1;
                    }
                    loop {
                        let lo = *chars
                            .get(i)
                            .ok_or_else(|| invalid("unterminated '[' in a LIKE pattern"))?;
                        i += 1;
                        if lo == ']' && !ranges.is_empty() {
                            break;
                        }
                        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']')
                        {
                            ranges.push((lo, chars[i + 1]));
                            i += 2;
                        } else {
                            ranges.push((lo, lo));
                        }
                    }
                    Atom::Set(ranges, negated)
                }
                (_, c) => Atom::Char(c),
            };
            steps.push(Step {
                atom,
                repeat: false,
            });
        }
        Ok(Pattern { steps })
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let n = self.steps.len();
        let mut current = vec![false; n + 1];
        let mut next = vec![false; n + 1];
        current[0] = true;
        self.close(&mut current);
        for c in text.chars() {
            next.iter_mut().for_each(|s| *s = false);
            let mut any = false;
            for (i, step) in self.steps.iter().enumerate() {
                if current[i] && step.atom.accepts(c) {
                    if step.repeat {
                        next[i] = true;
                    } else {
                        next[i + 1] = true;
                    }
                    any = true;
                }
            }
            if !any {
                return false;
            }
            self.close(&mut next);
            std::mem::swap(&mut current, &mut next);
        }
        current[n]
    }

    /// A repeated step may match nothing: being before it means being after it too.
    fn close(&self, states: &mut [bool]) {
        for (i, step) in self.steps.iter().enumerate() {
            if states[i] && step.repeat {
                states[i + 1] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns() {
        let w = |p: &str, t: &str| Pattern::compile(p, Language::Wql).unwrap().matches(t);
        assert!(w("a%c", "abbbc"));
        assert!(w("a_c", "abc"));
        assert!(!w("a_c", "abbc"));
        assert!(w("[a-c]x", "bx"));
        assert!(w("[^a-c]x", "dx"));
        assert!(w("%", ""));
        let c = |p: &str, t: &str| Pattern::compile(p, Language::Cql).unwrap().matches(t);
        assert!(c("ab*c", "ac"));
        assert!(c("a.*z", "abcz"));
        assert!(c("a\\.b", "a.b"));
        assert!(!c("a\\.b", "axb"));
    }
}
