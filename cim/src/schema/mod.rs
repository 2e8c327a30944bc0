//! The classes this endpoint implements: the DMTF classes it uses (`schema/dmtf.mof`, generated
//! from the DMTF CIM Schema 2.41 by `schema/extract.py`) and lockstep's own `LKS_` subclasses
//! (`schema/lks.mof`), parsed once at start into a [`Schema`] with inheritance resolved.

pub mod mof;

use std::collections::HashMap;
use std::sync::Arc;

use crate::value::{CimType, Value};

/// The DMTF part of the schema.
const DMTF_MOF: &str = include_str!("../../schema/dmtf.mof");
/// lockstep's classes.
const LKS_MOF: &str = include_str!("../../schema/lks.mof");

/// A qualifier value as MOF writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum QualValue {
    /// `Key`, `Write ( false )`
    Bool(bool),
    /// `Override ( "Name" )`
    Str(String),
    /// `ValueMap { "1", "2" }`
    StrArray(Vec<String>),
    /// `MaxLen ( 256 )`
    Int(i64),
}

/// A qualifier on a class, property, method or parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Qualifier {
    /// Its name as declared.
    pub name: String,
    /// Its value.
    pub value: QualValue,
}

impl Qualifier {
    /// The CIM type of the value, for CIM-XML's `TYPE` attribute.
    pub fn cim_type(&self) -> CimType {
        match &self.value {
            QualValue::Bool(_) => CimType::Boolean,
            QualValue::Str(_) | QualValue::StrArray(_) => CimType::String,
            QualValue::Int(_) => CimType::UInt32,
        }
    }
}

/// A property declaration.
#[derive(Debug, Clone)]
pub struct PropertyDecl {
    /// Name.
    pub name: String,
    /// Type (element type for arrays).
    pub ty: CimType,
    /// Whether it is an array.
    pub array: bool,
    /// For references, the referenced class.
    pub ref_class: Option<String>,
    /// Default value.
    pub default: Option<Value>,
    /// Its qualifiers (inherited ones included once resolved). Shared: every subclass that
    /// inherits the property unchanged points at the same list (DMTF's descriptions are long).
    pub qualifiers: Arc<[Qualifier]>,
    /// The class that declared it first (set when resolved).
    pub class_origin: String,
    /// Whether it comes unchanged from a superclass.
    pub propagated: bool,
}

/// A method parameter.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    /// Name.
    pub name: String,
    /// Type.
    pub ty: CimType,
    /// Whether it is an array.
    pub array: bool,
    /// For references, the referenced class.
    pub ref_class: Option<String>,
    /// Qualifiers (IN, OUT, EmbeddedInstance, ...).
    pub qualifiers: Vec<Qualifier>,
}

/// A method declaration.
#[derive(Debug, Clone)]
pub struct MethodDecl {
    /// Name.
    pub name: String,
    /// Return type.
    pub return_type: CimType,
    /// Parameters in order (shared with the subclasses that inherit the method).
    pub params: Arc<[ParamDecl]>,
    /// Qualifiers (shared likewise).
    pub qualifiers: Arc<[Qualifier]>,
    /// The class that declared it first.
    pub class_origin: String,
    /// Whether it comes unchanged from a superclass.
    pub propagated: bool,
}

/// A class as declared in MOF (only its own features).
#[derive(Debug, Clone)]
pub struct ClassDecl {
    /// Name.
    pub name: String,
    /// Superclass name.
    pub superclass: Option<String>,
    /// Class qualifiers.
    pub qualifiers: Vec<Qualifier>,
    /// Properties declared or overridden here.
    pub properties: Vec<PropertyDecl>,
    /// Methods declared or overridden here.
    pub methods: Vec<MethodDecl>,
}

/// A class with everything it inherits.
#[derive(Debug, Clone)]
pub struct Class {
    /// Name.
    pub name: String,
    /// Superclass name.
    pub superclass: Option<String>,
    /// Class qualifiers (its own, plus Association and Indication inherited).
    pub qualifiers: Vec<Qualifier>,
    /// All properties, superclass ones first.
    pub properties: Vec<PropertyDecl>,
    /// All methods.
    pub methods: Vec<MethodDecl>,
    /// Whether it is an association.
    pub association: bool,
    /// Whether it is an indication.
    pub indication: bool,
    /// Whether it is abstract.
    pub abstract_class: bool,
}

/// Looks a qualifier up by name.
pub fn find_qualifier<'a>(quals: &'a [Qualifier], name: &str) -> Option<&'a QualValue> {
    quals
        .iter()
        .find(|q| q.name.eq_ignore_ascii_case(name))
        .map(|q| &q.value)
}

/// Whether a boolean qualifier is present and true.
pub fn has_flag(quals: &[Qualifier], name: &str) -> bool {
    matches!(find_qualifier(quals, name), Some(QualValue::Bool(true)))
}

/// A string qualifier's value.
pub fn qualifier_str<'a>(quals: &'a [Qualifier], name: &str) -> Option<&'a str> {
    match find_qualifier(quals, name) {
        Some(QualValue::Str(s)) => Some(s),
        _ => None,
    }
}

impl PropertyDecl {
    /// Whether the property is a key.
    pub fn is_key(&self) -> bool {
        has_flag(&self.qualifiers, "Key")
    }
}

impl Class {
    /// A property by case-insensitive name.
    pub fn property(&self, name: &str) -> Option<&PropertyDecl> {
        self.properties
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// A method by case-insensitive name.
    pub fn method(&self, name: &str) -> Option<&MethodDecl> {
        self.methods
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// The key properties.
    pub fn keys(&self) -> impl Iterator<Item = &PropertyDecl> {
        self.properties.iter().filter(|p| p.is_key())
    }
}

/// Why the schema could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A MOF file did not parse.
    #[error("{file}: {source}")]
    Mof {
        /// Which file.
        file: &'static str,
        /// The syntax error.
        #[source]
        source: mof::MofError,
    },
    /// A class names a superclass declared nowhere before it.
    #[error("class {class}: superclass {superclass} is not declared before it")]
    MissingSuperclass {
        /// The class.
        class: String,
        /// Its superclass.
        superclass: String,
    },
}

/// Every class, with lookups by name and by superclass.
#[derive(Debug)]
pub struct Schema {
    classes: Vec<Class>,
    by_name: HashMap<String, usize>,
    children: Vec<Vec<usize>>,
}

impl Schema {
    /// Parses and resolves the built-in class files.
    pub fn load() -> Result<Schema, SchemaError> {
        let mut decls = mof::parse(DMTF_MOF).map_err(|source| SchemaError::Mof {
            file: "dmtf.mof",
            source,
        })?;
        decls.extend(mof::parse(LKS_MOF).map_err(|source| SchemaError::Mof {
            file: "lks.mof",
            source,
        })?);
        Schema::from_decls(decls)
    }

    /// Resolves inheritance; superclasses must come before their subclasses.
    pub fn from_decls(decls: Vec<ClassDecl>) -> Result<Schema, SchemaError> {
        let mut schema = Schema {
            classes: Vec::with_capacity(decls.len()),
            by_name: HashMap::new(),
            children: Vec::new(),
        };
        for decl in decls {
            let parent = match &decl.superclass {
                Some(s) => Some(
                    schema
                        .index(s)
                        .ok_or_else(|| SchemaError::MissingSuperclass {
                            class: decl.name.clone(),
                            superclass: s.clone(),
                        })?,
                ),
                None => None,
            };
            let class = resolve(decl, parent.map(|i| &schema.classes[i]));
            let idx = schema.classes.len();
            schema.by_name.insert(class.name.to_ascii_lowercase(), idx);
            // The exact spelling too, so that lookups by a correctly spelt name need no
            // lowercase copy.
            schema.by_name.insert(class.name.clone(), idx);
            schema.children.push(Vec::new());
            if let Some(p) = parent {
                schema.children[p].push(idx);
            }
            schema.classes.push(class);
        }
        Ok(schema)
    }

    fn index(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.by_name.get(name) {
            return Some(i);
        }
        self.by_name.get(&name.to_ascii_lowercase()).copied()
    }

    /// A class by case-insensitive name.
    pub fn class(&self, name: &str) -> Option<&Class> {
        self.index(name).map(|i| &self.classes[i])
    }

    /// Every class, superclasses before subclasses.
    pub fn classes(&self) -> &[Class] {
        &self.classes
    }

    /// The direct subclasses of `name`, or the root classes when `name` is `None`.
    pub fn subclasses(&self, name: Option<&str>) -> Vec<&Class> {
        match name {
            None => self
                .classes
                .iter()
                .filter(|c| c.superclass.is_none())
                .collect(),
            Some(n) => match self.index(n) {
                Some(i) => self.children[i].iter().map(|&c| &self.classes[c]).collect(),
                None => Vec::new(),
            },
        }
    }

    /// `name` and all classes below it, in declaration order.
    pub fn descendants(&self, name: &str) -> Vec<&Class> {
        let Some(root) = self.index(name) else {
            return Vec::new();
        };
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            out.extend(self.children[out[i]].iter().copied());
            i += 1;
        }
        out.sort_unstable();
        out.into_iter().map(|i| &self.classes[i]).collect()
    }

    /// Whether `class` is `ancestor` or derives from it.
    pub fn is_a(&self, class: &str, ancestor: &str) -> bool {
        let mut current = self.class(class);
        while let Some(c) = current {
            if c.name.eq_ignore_ascii_case(ancestor) {
                return true;
            }
            current = c.superclass.as_deref().and_then(|s| self.class(s));
        }
        false
    }
}

/// Builds a class from its declaration and its resolved superclass.
/// `qualifiers` less `Override`, which only says how a declaration relates to its superclass.
fn without_override(qualifiers: &[Qualifier]) -> Arc<[Qualifier]> {
    qualifiers
        .iter()
        .filter(|q| !q.name.eq_ignore_ascii_case("Override"))
        .cloned()
        .collect()
}

fn resolve(decl: ClassDecl, parent: Option<&Class>) -> Class {
    let mut properties: Vec<PropertyDecl> = Vec::new();
    let mut methods: Vec<MethodDecl> = Vec::new();
    let mut qualifiers = decl.qualifiers;
    if let Some(p) = parent {
        properties = p
            .properties
            .iter()
            .map(|prop| PropertyDecl {
                propagated: true,
                ..prop.clone()
            })
            .collect();
        methods = p
            .methods
            .iter()
            .map(|m| MethodDecl {
                propagated: true,
                ..m.clone()
            })
            .collect();
        for inherited in ["Association", "Indication", "Exception"] {
            if has_flag(&p.qualifiers, inherited)
                && find_qualifier(&qualifiers, inherited).is_none()
            {
                qualifiers.push(Qualifier {
                    name: inherited.to_string(),
                    value: QualValue::Bool(true),
                });
            }
        }
    }
    for mut prop in decl.properties {
        match properties
            .iter_mut()
            .find(|p| p.name.eq_ignore_ascii_case(&prop.name))
        {
            Some(slot) => {
                // An override keeps the origin and inherited qualifiers it does not restate.
                let mut quals = slot.qualifiers.to_vec();
                for q in prop.qualifiers.iter().cloned() {
                    if q.name.eq_ignore_ascii_case("Override") {
                        continue;
                    }
                    match quals
                        .iter_mut()
                        .find(|o| o.name.eq_ignore_ascii_case(&q.name))
                    {
                        Some(o) => *o = q,
                        None => quals.push(q),
                    }
                }
                prop.qualifiers = quals.into();
                prop.class_origin = slot.class_origin.clone();
                if prop.default.is_none() {
                    prop.default = slot.default.clone();
                }
                *slot = prop;
            }
            None => {
                prop.class_origin = decl.name.clone();
                prop.qualifiers = without_override(&prop.qualifiers);
                properties.push(prop);
            }
        }
    }
    for mut method in decl.methods {
        method.qualifiers = without_override(&method.qualifiers);
        match methods
            .iter_mut()
            .find(|m| m.name.eq_ignore_ascii_case(&method.name))
        {
            Some(slot) => {
                method.class_origin = slot.class_origin.clone();
                *slot = method;
            }
            None => {
                method.class_origin = decl.name.clone();
                methods.push(method);
            }
        }
    }
    Class {
        association: has_flag(&qualifiers, "Association"),
        indication: has_flag(&qualifiers, "Indication"),
        abstract_class: has_flag(&qualifiers, "Abstract"),
        name: decl.name,
        superclass: decl.superclass,
        qualifiers,
        properties,
        methods,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_schema_loads_and_inherits() {
        let schema = Schema::load().unwrap();
        let cs = schema.class("lks_virtualcomputersystem").unwrap();
        assert!(cs.property("EnabledState").is_some());
        let mut keys: Vec<&str> = cs.keys().map(|p| p.name.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["CreationClassName", "Name"]);
        assert!(cs.method("RequestStateChange").is_some());
        assert!(schema.is_a("LKS_VirtualComputerSystem", "CIM_ManagedElement"));
        assert!(
            schema
                .class("CIM_ElementConformsToProfile")
                .unwrap()
                .association
        );
        assert!(schema.class("CIM_InstModification").unwrap().indication);
        let below = schema.descendants("CIM_ComputerSystem");
        assert!(below.iter().any(|c| c.name == "LKS_HostComputerSystem"));
    }
}
