//! Positions in configuration files, for errors a human can act on.

use std::{fmt, ops::Range, path::PathBuf};

/// A file's name and text, kept to turn byte spans into line and column.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// `file:line:column`, 1-based, as editors and compilers print it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// Location of the first byte of `span` (clamped to the text).
    pub fn locate(&self, span: &Range<usize>) -> Location {
        let offset = span.start.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        // Columns count characters, not bytes.
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        Location {
            path: self.path.clone(),
            line,
            column,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_and_column() {
        let s = Source::new("f.toml", "a = 1\nbé = 2\n  c = 3\n");
        assert_eq!(s.locate(&(0..1)).line, 1);
        let l = s.locate(&(10..11));
        assert_eq!((l.line, l.column), (2, 4), "columns count characters");
        let l = s.locate(&(14..15));
        assert_eq!((l.line, l.column), (3, 1));
        let l = s.locate(&(16..17));
        assert_eq!((l.line, l.column), (3, 3));
        assert_eq!(s.locate(&(999..1000)).line, 4);
        assert_eq!(l.to_string(), "f.toml:3:3");
    }
}
