//! CIM data: types, typed values, instance paths and instances (DSP0004), independent of how
//! they travel (CIM-XML) or where they come from (the model, a client).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

/// A CIM data type (DSP0004 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CimType {
    /// `boolean`
    Boolean,
    /// `string`
    String,
    /// `char16`
    Char16,
    /// `datetime`
    DateTime,
    /// `uint8`
    UInt8,
    /// `uint16`
    UInt16,
    /// `uint32`
    UInt32,
    /// `uint64`
    UInt64,
    /// `sint8`
    SInt8,
    /// `sint16`
    SInt16,
    /// `sint32`
    SInt32,
    /// `sint64`
    SInt64,
    /// `real32`
    Real32,
    /// `real64`
    Real64,
    /// A reference to an instance.
    Reference,
}

impl CimType {
    /// The type's name as MOF and CIM-XML spell it.
    pub fn name(self) -> &'static str {
        match self {
            CimType::Boolean => "boolean",
            CimType::String => "string",
            CimType::Char16 => "char16",
            CimType::DateTime => "datetime",
            CimType::UInt8 => "uint8",
            CimType::UInt16 => "uint16",
            CimType::UInt32 => "uint32",
            CimType::UInt64 => "uint64",
            CimType::SInt8 => "sint8",
            CimType::SInt16 => "sint16",
            CimType::SInt32 => "sint32",
            CimType::SInt64 => "sint64",
            CimType::Real32 => "real32",
            CimType::Real64 => "real64",
            CimType::Reference => "reference",
        }
    }

    /// Parses a type name (case-insensitive); `ref` is not a type name here.
    pub fn parse(name: &str) -> Option<CimType> {
        const ALL: [CimType; 15] = [
            CimType::Boolean,
            CimType::String,
            CimType::Char16,
            CimType::DateTime,
            CimType::UInt8,
            CimType::UInt16,
            CimType::UInt32,
            CimType::UInt64,
            CimType::SInt8,
            CimType::SInt16,
            CimType::SInt32,
            CimType::SInt64,
            CimType::Real32,
            CimType::Real64,
            CimType::Reference,
        ];
        ALL.into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The range of an integer type, as i128 so every CIM integer fits.
    fn range(self) -> Option<(i128, i128)> {
        Some(match self {
            CimType::UInt8 => (0, u8::MAX.into()),
            CimType::UInt16 => (0, u16::MAX.into()),
            CimType::UInt32 => (0, u32::MAX.into()),
            CimType::UInt64 => (0, u64::MAX.into()),
            CimType::SInt8 => (i8::MIN.into(), i8::MAX.into()),
            CimType::SInt16 => (i16::MIN.into(), i16::MAX.into()),
            CimType::SInt32 => (i32::MIN.into(), i32::MAX.into()),
            CimType::SInt64 => (i64::MIN.into(), i64::MAX.into()),
            _ => return None,
        })
    }
}

/// One key of an instance path.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyBinding {
    /// Key property name.
    pub name: Cow<'static, str>,
    /// Its value (string, number, boolean or reference).
    pub value: Value,
}

/// The path of an instance: namespace, class and keys (DSP0004 8.2).
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectPath {
    /// The namespace, e.g. `root/cimv2`; empty when the path is local to its context.
    pub namespace: Cow<'static, str>,
    /// The class name.
    pub class: Cow<'static, str>,
    /// The key bindings.
    pub keys: Vec<KeyBinding>,
}

impl ObjectPath {
    /// A path with no keys yet.
    pub fn new(
        namespace: impl Into<Cow<'static, str>>,
        class: impl Into<Cow<'static, str>>,
    ) -> Self {
        ObjectPath {
            namespace: namespace.into(),
            class: class.into(),
            keys: Vec::new(),
        }
    }

    /// Adds a key binding.
    pub fn key(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.keys.push(KeyBinding {
            name: Cow::Borrowed(name),
            value: value.into(),
        });
        self
    }

    /// The value of a key, by case-insensitive name.
    pub fn get_key(&self, name: &str) -> Option<&Value> {
        self.keys
            .iter()
            .find(|k| k.name.eq_ignore_ascii_case(name))
            .map(|k| &k.value)
    }

    /// A string key's value.
    pub fn key_str(&self, name: &str) -> Option<&str> {
        self.get_key(name).and_then(Value::as_str)
    }

    /// The path, placed in `namespace` when it names none (paths in requests may leave it out).
    pub fn or_namespace(mut self, namespace: &'static str) -> Self {
        if self.namespace.is_empty() {
            self.namespace = namespace.into();
        }
        self
    }

    /// Whether two paths name the same instance: class names and key names compare without
    /// case, key order does not matter, and an empty namespace matches any.
    pub fn same_instance(&self, other: &ObjectPath) -> bool {
        if !self.class.eq_ignore_ascii_case(&other.class) || self.keys.len() != other.keys.len() {
            return false;
        }
        if !self.namespace.is_empty()
            && !other.namespace.is_empty()
            && !namespace_eq(&self.namespace, &other.namespace)
        {
            return false;
        }
        self.keys
            .iter()
            .all(|k| other.get_key(&k.name).is_some_and(|v| v.key_eq(&k.value)))
    }
}

/// Namespace names compare without case and ignore leading or trailing slashes.
pub fn namespace_eq(a: &str, b: &str) -> bool {
    a.trim_matches('/')
        .eq_ignore_ascii_case(b.trim_matches('/'))
}

impl fmt::Display for ObjectPath {
    /// The WBEM URI form (DSP0207 untyped), e.g. `/root/cimv2:LKS_X.Name="a"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.namespace.is_empty() {
            write!(f, "/{}:", self.namespace)?;
        }
        write!(f, "{}", self.class)?;
        for (i, k) in self.keys.iter().enumerate() {
            write!(f, "{}{}=", if i == 0 { '.' } else { ',' }, k.name)?;
            match &k.value {
                Value::Str(s) => write!(f, "\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))?,
                Value::Ref(p) => write!(f, "\"{}\"", p.to_string().replace('"', "\\\""))?,
                other => write!(f, "{}", other.to_text())?,
            }
        }
        Ok(())
    }
}

/// A typed CIM value. Integers carry their declared type so that they are written back with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// An unsigned integer of the given type.
    UInt(u64, CimType),
    /// A signed integer of the given type.
    SInt(i64, CimType),
    /// A real of the given type.
    Real(f64, CimType),
    /// A string (borrowed when it is a constant of the model).
    Str(Cow<'static, str>),
    /// A char16.
    Char16(char),
    /// A datetime in DSP0004's 25-character form.
    DateTime(String),
    /// A reference.
    Ref(Box<ObjectPath>),
    /// An embedded instance (a string property with the EmbeddedInstance qualifier).
    Embedded(Box<Instance>),
    /// An array of values of one type.
    Array(CimType, Vec<Value>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(Cow::Owned(s.to_string()))
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(Cow::Owned(s))
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<u16> for Value {
    fn from(n: u16) -> Self {
        Value::UInt(n.into(), CimType::UInt16)
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::UInt(n.into(), CimType::UInt32)
    }
}
impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Value::UInt(n, CimType::UInt64)
    }
}
impl From<ObjectPath> for Value {
    fn from(p: ObjectPath) -> Self {
        Value::Ref(Box::new(p))
    }
}

impl Value {
    /// A string constant (no copy).
    pub const fn from_static(s: &'static str) -> Value {
        Value::Str(Cow::Borrowed(s))
    }

    /// A uint16 array.
    pub fn u16_array(items: &[u16]) -> Value {
        Value::Array(
            CimType::UInt16,
            items.iter().map(|&n| Value::from(n)).collect(),
        )
    }

    /// A string array.
    pub fn str_array<S: AsRef<str>>(items: &[S]) -> Value {
        Value::Array(
            CimType::String,
            items
                .iter()
                .map(|s| Value::from(s.as_ref().to_string()))
                .collect(),
        )
    }

    /// The value's CIM type (for an array, its element type).
    pub fn cim_type(&self) -> CimType {
        match self {
            Value::Bool(_) => CimType::Boolean,
            Value::UInt(_, t) | Value::SInt(_, t) | Value::Real(_, t) | Value::Array(t, _) => *t,
            Value::Str(_) | Value::Embedded(_) => CimType::String,
            Value::Char16(_) => CimType::Char16,
            Value::DateTime(_) => CimType::DateTime,
            Value::Ref(_) => CimType::Reference,
        }
    }

    /// The string inside a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::DateTime(s) => Some(s),
            _ => None,
        }
    }

    /// The number inside an integer value, when it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::UInt(n, _) => Some(*n),
            Value::SInt(n, _) => u64::try_from(*n).ok(),
            Value::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The value as its CIM-XML `<VALUE>` text (scalars only; arrays give an empty string).
    pub fn to_text(&self) -> Cow<'_, str> {
        match self {
            Value::Bool(true) => Cow::Borrowed("TRUE"),
            Value::Bool(false) => Cow::Borrowed("FALSE"),
            Value::UInt(n, _) => Cow::Owned(n.to_string()),
            Value::SInt(n, _) => Cow::Owned(n.to_string()),
            Value::Real(x, _) => Cow::Owned(format!("{x:e}")),
            Value::Str(s) => Cow::Borrowed(s),
            Value::DateTime(s) => Cow::Borrowed(s),
            Value::Char16(c) => Cow::Owned(c.to_string()),
            Value::Ref(p) => Cow::Owned(p.to_string()),
            Value::Embedded(_) | Value::Array(..) => Cow::Borrowed(""),
        }
    }

    /// Reads a scalar of type `ty` from its CIM-XML text; `None` when the text is not one.
    pub fn parse_scalar(ty: CimType, text: &str) -> Option<Value> {
        let t = text.trim();
        Some(match ty {
            CimType::Boolean => match t.to_ascii_lowercase().as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return None,
            },
            CimType::String => Value::from(text.to_string()),
            CimType::Char16 => {
                let mut chars = text.chars();
                let c = chars.next()?;
                if chars.next().is_some() {
                    return None;
                }
                Value::Char16(c)
            }
            CimType::DateTime => Value::DateTime(t.to_string()),
            CimType::Real32 | CimType::Real64 => Value::Real(t.parse().ok()?, ty),
            CimType::Reference => return None,
            int => {
                let n = parse_int(t)?;
                let (lo, hi) = int.range()?;
                if n < lo || n > hi {
                    return None;
                }
                if lo == 0 {
                    Value::UInt(u64::try_from(n).ok()?, int)
                } else {
                    Value::SInt(i64::try_from(n).ok()?, int)
                }
            }
        })
    }

    /// Converts a value a client sent (perhaps as an untyped string) to the declared type.
    pub fn coerce(self, ty: CimType) -> Option<Value> {
        match (self, ty) {
            (Value::Array(_, items), _) => {
                let items: Option<Vec<Value>> = items.into_iter().map(|v| v.coerce(ty)).collect();
                Some(Value::Array(ty, items?))
            }
            (v @ Value::Ref(_), CimType::Reference) => Some(v),
            (v @ Value::Embedded(_), CimType::String) => Some(v),
            (Value::Str(s), t) => Value::parse_scalar(t, &s),
            (v, t) if v.cim_type() == t => Some(v),
            (v, t) => Value::parse_scalar(t, &v.to_text()),
        }
    }

    /// Equality as keys compare: strings exactly, numbers by value whatever their type.
    pub fn key_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Ref(a), Value::Ref(b)) => a.same_instance(b),
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => self.compare(other) == Some(Ordering::Equal),
        }
    }

    /// Orders two scalars of compatible types (numbers with numbers, strings with strings);
    /// `None` when they cannot be compared.
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self.number(), other.number()) {
            (Some(a), Some(b)) => return a.partial_cmp(&b),
            (Some(_), None) | (None, Some(_)) => {
                // A number against a string: compare as numbers when the string is one.
                let (n, s) = if self.number().is_some() {
                    (self, other)
                } else {
                    (other, self)
                };
                let parsed: f64 = s.as_str()?.trim().parse().ok()?;
                let ord = n.number()?.partial_cmp(&parsed)?;
                return Some(if self.number().is_some() {
                    ord
                } else {
                    ord.reverse()
                });
            }
            _ => {}
        }
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Bool(a), Value::Str(s)) | (Value::Str(s), Value::Bool(a)) => s
                .eq_ignore_ascii_case(if *a { "true" } else { "false" })
                .then_some(Ordering::Equal)
                .or(Some(Ordering::Less)),
            (Value::Ref(a), Value::Ref(b)) => a.same_instance(b).then_some(Ordering::Equal),
            (Value::Ref(a), Value::Str(s)) | (Value::Str(s), Value::Ref(a)) => (a.to_string()
                == *s)
                .then_some(Ordering::Equal)
                .or(Some(Ordering::Less)),
            _ => Some(self.to_text().as_ref().cmp(other.to_text().as_ref())),
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Value::UInt(n, _) => Some(*n as f64),
            Value::SInt(n, _) => Some(*n as f64),
            Value::Real(x, _) => Some(*x),
            _ => None,
        }
    }
}

/// Integers as MOF and CIM-XML allow them: decimal, `0x` hex, with a sign.
fn parse_int(t: &str) -> Option<i128> {
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.is_empty() || digits.len() > 40 {
        return None;
    }
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i128::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i128>().ok()?,
    };
    Some(if neg { -n } else { n })
}

/// An instance: its class, its path (when it has one) and its property values. Properties
/// without a value (NULL) are left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The class name.
    pub class: Cow<'static, str>,
    /// The instance path, for instances that have one.
    pub path: Option<ObjectPath>,
    /// Property name and value, in the order the class declares them.
    pub props: Vec<(Cow<'static, str>, Value)>,
}

impl Instance {
    /// An instance of `class` with no properties yet.
    pub fn new(class: impl Into<Cow<'static, str>>) -> Instance {
        Instance {
            class: class.into(),
            path: None,
            props: Vec::with_capacity(16),
        }
    }

    /// Adds a property (builder style; each name once).
    pub fn with(mut self, name: &'static str, value: impl Into<Value>) -> Instance {
        // Builders name each property once; `set` (which replaces) would scan every time.
        debug_assert!(self.get(name).is_none(), "{name} set twice");
        self.props.push((Cow::Borrowed(name), value.into()));
        self
    }

    /// Sets a property when `value` is some.
    pub fn with_opt(self, name: &'static str, value: Option<impl Into<Value>>) -> Instance {
        match value {
            Some(v) => self.with(name, v),
            None => self,
        }
    }

    /// Sets or replaces a property.
    pub fn set(&mut self, name: Cow<'static, str>, value: Value) {
        match self
            .props
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some(slot) => slot.1 = value,
            None => self.props.push((name, value)),
        }
    }

    /// A property's value, by case-insensitive name.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.props
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// A string property.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_parse_within_their_range() {
        assert_eq!(
            Value::parse_scalar(CimType::UInt8, "255"),
            Some(Value::UInt(255, CimType::UInt8))
        );
        assert_eq!(Value::parse_scalar(CimType::UInt8, "256"), None);
        assert_eq!(
            Value::parse_scalar(CimType::SInt16, "-0x10"),
            Some(Value::SInt(-16, CimType::SInt16))
        );
        assert_eq!(
            Value::parse_scalar(CimType::Boolean, "True"),
            Some(Value::Bool(true))
        );
        assert_eq!(
            Value::parse_scalar(CimType::UInt64, &"9".repeat(1000)),
            None
        );
    }

    #[test]
    fn paths_compare_without_case_or_order() {
        let a = ObjectPath::new("root/cimv2", "LKS_X")
            .key("A", "1")
            .key("B", 2u16);
        let b = ObjectPath::new("", "lks_x").key("b", 2u32).key("a", "1");
        assert!(a.same_instance(&b));
        let c = ObjectPath::new("root/interop", "LKS_X")
            .key("A", "1")
            .key("B", 2u16);
        assert!(!a.same_instance(&c));
        assert_eq!(a.to_string(), "/root/cimv2:LKS_X.A=\"1\",B=2");
    }

    #[test]
    fn mixed_comparisons() {
        let two = Value::from(2u16);
        assert_eq!(two.compare(&Value::from("2")), Some(Ordering::Equal));
        assert_eq!(
            Value::from("b").compare(&Value::from("a")),
            Some(Ordering::Greater)
        );
        assert_eq!(
            Value::from("3").coerce(CimType::UInt16),
            Some(Value::UInt(3, CimType::UInt16))
        );
    }
}
