//! A parser for the subset of MOF (DSP0221) our class files use: class declarations with
//! qualifiers, properties (scalar, array, reference, with defaults) and methods with
//! parameters. No instances, qualifier declarations or pragmas other than being skipped.

use super::{ClassDecl, MethodDecl, ParamDecl, PropertyDecl, QualValue, Qualifier};
use crate::value::{CimType, Value};

/// A MOF syntax error with its line.
#[derive(Debug, thiserror::Error)]
#[error("MOF line {line}: {message}")]
pub struct MofError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn err(&self, message: impl Into<String>) -> MofError {
        MofError {
            line: self.line,
            message: message.into(),
        }
    }

    fn skip_space(&mut self) {
        loop {
            while self.pos < self.text.len() && self.text[self.pos].is_ascii_whitespace() {
                if self.text[self.pos] == b'\n' {
                    self.line += 1;
                }
                self.pos += 1;
            }
            let rest = &self.text[self.pos..];
            if rest.starts_with(b"//") || rest.starts_with(b"#") {
                while self.pos < self.text.len() && self.text[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if rest.starts_with(b"/*") {
                self.pos += 2;
                while self.pos < self.text.len() && !self.text[self.pos..].starts_with(b"*/") {
                    if self.text[self.pos] == b'\n' {
                        self.line += 1;
                    }
                    self.pos += 1;
                }
                self.pos = (self.pos + 2).min(self.text.len());
            } else {
                return;
            }
        }
    }

    fn next(&mut self) -> Result<Option<Token>, MofError> {
        self.skip_space();
        let Some(&c) = self.text.get(self.pos) else {
            return Ok(None);
        };
        if c == b'"' {
            return self.string().map(|s| Some(Token::Str(s)));
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = self.pos;
            while self
                .text
                .get(self.pos)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
            {
                self.pos += 1;
            }
            return Ok(Some(Token::Ident(self.slice(start))));
        }
        if c.is_ascii_digit() || c == b'-' || c == b'+' || c == b'.' {
            let start = self.pos;
            self.pos += 1;
            while self.text.get(self.pos).is_some_and(|c| {
                c.is_ascii_alphanumeric() || *c == b'.' || *c == b'+' || *c == b'-'
            }) {
                self.pos += 1;
            }
            return Ok(Some(Token::Num(self.slice(start))));
        }
        self.pos += 1;
        Ok(Some(Token::Punct(char::from(c))))
    }

    fn slice(&self, start: usize) -> String {
        String::from_utf8_lossy(&self.text[start..self.pos]).into_owned()
    }

    fn string(&mut self) -> Result<String, MofError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.text.get(self.pos) else {
                return Err(self.err("unterminated string"));
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = *self
                        .text
                        .get(self.pos)
                        .ok_or_else(|| self.err("bad escape"))?;
                    self.pos += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        other => other,
                    });
                }
                b'\n' => return Err(self.err("newline in string")),
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }
}

/// Parses MOF text into class declarations, in file order.
pub fn parse(text: &str) -> Result<Vec<ClassDecl>, MofError> {
    let mut lexer = Lexer {
        text: text.as_bytes(),
        pos: 0,
        line: 1,
    };
    let mut tokens = Vec::new();
    let mut lines = Vec::new();
    while let Some(t) = lexer.next()? {
        lines.push(lexer.line);
        tokens.push(t);
    }
    let mut p = Parser {
        tokens,
        lines,
        pos: 0,
    };
    let mut classes = Vec::new();
    while p.pos < p.tokens.len() {
        classes.push(p.class()?);
    }
    Ok(classes)
}

struct Parser {
    tokens: Vec<Token>,
    lines: Vec<usize>,
    pos: usize,
}

impl Parser {
    fn err(&self, message: impl Into<String>) -> MofError {
        MofError {
            line: self
                .lines
                .get(self.pos.saturating_sub(1))
                .copied()
                .unwrap_or(0),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn bump(&mut self) -> Result<Token, MofError> {
        let t = self
            .peek()
            .cloned()
            .ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(t)
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Token::Punct(c))
    }

    fn expect(&mut self, c: char) -> Result<(), MofError> {
        match self.bump()? {
            Token::Punct(p) if p == c => Ok(()),
            other => Err(self.err(format!("expected '{c}', found {other:?}"))),
        }
    }

    fn ident(&mut self) -> Result<String, MofError> {
        match self.bump()? {
            Token::Ident(s) => Ok(s),
            other => Err(self.err(format!("expected a name, found {other:?}"))),
        }
    }

    fn qualifiers(&mut self) -> Result<Vec<Qualifier>, MofError> {
        let mut out = Vec::new();
        if !self.is_punct('[') {
            return Ok(out);
        }
        self.pos += 1;
        loop {
            let name = self.ident()?;
            let value = if self.is_punct('(') {
                self.pos += 1;
                let v = self.literal()?;
                self.expect(')')?;
                v
            } else if self.is_punct('{') {
                self.array_literal()?
            } else {
                QualValue::Bool(true)
            };
            out.push(Qualifier { name, value });
            if self.is_punct(',') {
                self.pos += 1;
                continue;
            }
            self.expect(']')?;
            return Ok(out);
        }
    }

    fn literal(&mut self) -> Result<QualValue, MofError> {
        match self.bump()? {
            Token::Str(mut s) => {
                while let Some(Token::Str(more)) = self.peek() {
                    s.push_str(more);
                    self.pos += 1;
                }
                Ok(QualValue::Str(s))
            }
            Token::Ident(w) if w.eq_ignore_ascii_case("true") => Ok(QualValue::Bool(true)),
            Token::Ident(w) if w.eq_ignore_ascii_case("false") => Ok(QualValue::Bool(false)),
            Token::Ident(w) if w.eq_ignore_ascii_case("null") => Ok(QualValue::Str(String::new())),
            Token::Num(n) => n
                .parse::<i64>()
                .map(QualValue::Int)
                .map_err(|_| self.err(format!("bad number {n}"))),
            other => Err(self.err(format!("expected a value, found {other:?}"))),
        }
    }

    fn array_literal(&mut self) -> Result<QualValue, MofError> {
        self.expect('{')?;
        let mut items = Vec::new();
        while !self.is_punct('}') {
            match self.literal()? {
                QualValue::Str(s) => items.push(s),
                QualValue::Int(n) => items.push(n.to_string()),
                QualValue::Bool(b) => items.push(b.to_string()),
                QualValue::StrArray(_) => return Err(self.err("nested array")),
            }
            if self.is_punct(',') {
                self.pos += 1;
            }
        }
        self.pos += 1;
        Ok(QualValue::StrArray(items))
    }

    fn class(&mut self) -> Result<ClassDecl, MofError> {
        let qualifiers = self.qualifiers()?;
        let kw = self.ident()?;
        if !kw.eq_ignore_ascii_case("class") {
            return Err(self.err(format!("expected 'class', found {kw}")));
        }
        let name = self.ident()?;
        let superclass = if self.is_punct(':') {
            self.pos += 1;
            Some(self.ident()?)
        } else {
            None
        };
        self.expect('{')?;
        let mut class = ClassDecl {
            name,
            superclass,
            qualifiers,
            properties: Vec::new(),
            methods: Vec::new(),
        };
        while !self.is_punct('}') {
            self.feature(&mut class)?;
        }
        self.pos += 1;
        self.expect(';')?;
        Ok(class)
    }

    /// A type: a CIM type name, or a class name followed by REF.
    fn data_type(&mut self) -> Result<(CimType, Option<String>), MofError> {
        let first = self.ident()?;
        if let Some(Token::Ident(r)) = self.peek() {
            if r.eq_ignore_ascii_case("ref") {
                self.pos += 1;
                return Ok((CimType::Reference, Some(first)));
            }
        }
        let ty = CimType::parse(&first).ok_or_else(|| self.err(format!("unknown type {first}")))?;
        Ok((ty, None))
    }

    fn array_suffix(&mut self) -> Result<bool, MofError> {
        if !self.is_punct('[') {
            return Ok(false);
        }
        self.pos += 1;
        if let Some(Token::Num(_)) = self.peek() {
            self.pos += 1;
        }
        self.expect(']')?;
        Ok(true)
    }

    fn feature(&mut self, class: &mut ClassDecl) -> Result<(), MofError> {
        let qualifiers = self.qualifiers()?;
        let (ty, ref_class) = self.data_type()?;
        let name = self.ident()?;
        if self.is_punct('(') {
            self.pos += 1;
            let mut params = Vec::new();
            while !self.is_punct(')') {
                let pq = self.qualifiers()?;
                let (pty, pref) = self.data_type()?;
                let pname = self.ident()?;
                let array = self.array_suffix()?;
                params.push(ParamDecl {
                    name: pname,
                    ty: pty,
                    array,
                    ref_class: pref,
                    qualifiers: pq,
                });
                if self.is_punct(',') {
                    self.pos += 1;
                }
            }
            self.pos += 1;
            self.expect(';')?;
            class.methods.push(MethodDecl {
                name,
                return_type: ty,
                params: params.into(),
                qualifiers: qualifiers.into(),
                class_origin: String::new(),
                propagated: false,
            });
            return Ok(());
        }
        let array = self.array_suffix()?;
        let default = if self.is_punct('=') {
            self.pos += 1;
            let lit = if self.is_punct('{') {
                self.array_literal()?
            } else {
                self.literal()?
            };
            Some(default_value(ty, array, lit).ok_or_else(|| self.err("bad default"))?)
        } else {
            None
        };
        self.expect(';')?;
        class.properties.push(PropertyDecl {
            name,
            ty,
            array,
            ref_class,
            default,
            qualifiers: qualifiers.into(),
            class_origin: String::new(),
            propagated: false,
        });
        Ok(())
    }
}

fn default_value(ty: CimType, array: bool, lit: QualValue) -> Option<Value> {
    let scalar = |text: &str| Value::parse_scalar(ty, text);
    match (array, lit) {
        (false, QualValue::Str(s)) => scalar(&s),
        (false, QualValue::Int(n)) => scalar(&n.to_string()),
        (false, QualValue::Bool(b)) => scalar(if b { "true" } else { "false" }),
        (true, QualValue::StrArray(items)) => {
            let values: Option<Vec<Value>> = items.iter().map(|s| scalar(s)).collect();
            Some(Value::Array(ty, values?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_properties_methods() {
        let text = r#"
            // comment
            [Abstract, Version ( "1.0" "." "2" )]
            class A {
                [Key ( true ), MaxLen ( 256 )] string Id;
                uint16 States[] = { 1, 2 };
                [Write] string Name = "x\"y";
                uint32 Go([IN, ValueMap { "2", ".." }] uint16 S, [OUT] CIM_Job REF Job, string L[]);
            };
            class B : A { A REF Other; };
        "#;
        let classes = parse(text).unwrap();
        assert_eq!(classes.len(), 2);
        let a = &classes[0];
        assert_eq!(a.qualifiers[1].value, QualValue::Str("1.0.2".into()));
        assert_eq!(
            a.properties[1].default,
            Some(Value::Array(
                CimType::UInt16,
                vec![Value::from(1u16), Value::from(2u16)]
            ))
        );
        assert_eq!(a.properties[2].default, Some(Value::Str("x\"y".into())));
        assert_eq!(a.methods[0].params.len(), 3);
        assert_eq!(a.methods[0].params[1].ref_class.as_deref(), Some("CIM_Job"));
        assert!(a.methods[0].params[2].array);
        assert_eq!(classes[1].properties[0].ty, CimType::Reference);
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("class A {\n string;\n};").unwrap_err();
        assert_eq!(err.line, 2);
    }
}
