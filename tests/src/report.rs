//! Reading the test guest's serial report: lines `LKS <key>=<value>`.

/// The report lines a test guest printed, in order.
#[derive(Debug, Clone, Default)]
pub struct GuestReport {
    lines: Vec<String>,
}

impl GuestReport {
    /// Collects the whole `LKS ` lines of a serial transcript (CR LF or LF line ends). A last
    /// line without its newline is still being written (`LKS counter=12` may be 123) and is
    /// left out.
    pub fn parse(serial: &str) -> Self {
        let lines = whole_lines(serial)
            .filter_map(|l| l.strip_prefix("LKS "))
            .map(str::to_string)
            .collect();
        GuestReport { lines }
    }

    /// The value of the first line `key=value` or `key field=value ...` (the latter gives the
    /// fields).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| value_of(l, key))
    }

    /// The values of every line for `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines.iter().filter_map(move |l| value_of(l, key))
    }

    /// The value of `key`, which the test requires.
    pub fn require(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| {
            panic!(
                "the guest reported no `{key}=`; its report was:\n{}",
                self.lines.join("\n")
            )
        })
    }

    /// The fields `name=value` of a line's value, e.g. `4 source=mptable` gives `source`.
    pub fn field<'a>(value: &'a str, name: &str) -> Option<&'a str> {
        value
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
    }

    /// Every report line.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

/// The lines of a transcript that a newline ends, without their CR LF or LF: a line still
/// being written when the transcript was read is left out.
pub fn whole_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end_matches(['\n', '\r']))
}

fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(key)?;
    rest.strip_prefix('=').or_else(|| rest.strip_prefix(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_fields() {
        let r = GuestReport::parse("noise\r\nLKS boot=pvh\r\nLKS cpus=4 source=mptable\nLKS e820=0,9fc00,1\nLKS e820=9fc00,400,2\nLKS initrd addr=0x1000 size=5\n");
        assert_eq!(r.get("initrd"), Some("addr=0x1000 size=5"));
        assert_eq!(r.get("e8"), None);
        assert_eq!(r.get("boot"), Some("pvh"));
        assert_eq!(
            GuestReport::field(r.require("cpus"), "source"),
            Some("mptable")
        );
        assert_eq!(r.all("e820").count(), 2);
        assert_eq!(r.get("nope"), None);
    }

    #[test]
    fn a_line_still_being_written_is_not_whole() {
        let text = "LKS a=1\r\nLKS b=2\nLKS net udp-journal listening";
        let whole: Vec<&str> = whole_lines(text).collect();
        assert_eq!(whole, ["LKS a=1", "LKS b=2"]);
        let report = GuestReport::parse("LKS counter=1 ns=5\nLKS counter=12");
        assert_eq!(report.all("counter").collect::<Vec<_>>(), ["1 ns=5"]);
    }
}
