//! A cursor over a decoded YAML document that knows its field path, so every error can say
//! where it happened and what value it saw.

use serde_json::{Map, Value};

use crate::error::Problem;

/// A failure at a path inside the document being parsed.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) path: String,
    pub(crate) problem: Problem,
}

/// Result of a step of the walk.
pub(crate) type R<T> = Result<T, Fail>;

/// A value and the path that leads to it.
#[derive(Debug, Clone)]
pub(crate) struct Node<'v> {
    pub(crate) v: &'v Value,
    pub(crate) path: String,
}

/// JSON rendering of a value for messages, cut short when long.
pub(crate) fn render(v: &Value) -> String {
    const MAX: usize = 120;
    let s = serde_json::to_string(v).unwrap_or_else(|_| "?".to_owned());
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl<'v> Node<'v> {
    /// The document root.
    pub(crate) fn root(v: &'v Value) -> Node<'v> {
        Node {
            v,
            path: String::new(),
        }
    }

    /// A failure at this node.
    pub(crate) fn fail(&self, problem: Problem) -> Fail {
        Fail {
            path: self.path.clone(),
            problem,
        }
    }

    /// "Invalid value" at this node, quoting the value.
    pub(crate) fn invalid(&self, reason: impl Into<String>) -> Fail {
        self.fail(Problem::InvalidValue {
            value: render(self.v),
            reason: reason.into(),
        })
    }

    /// "Not supported" at this node.
    pub(crate) fn unsupported(&self, reason: impl Into<String>) -> Fail {
        self.fail(Problem::Unsupported {
            reason: reason.into(),
        })
    }

    fn wrong(&self, expected: &'static str) -> Fail {
        self.fail(Problem::WrongType {
            expected,
            value: render(self.v),
        })
    }

    /// This node as an object whose keys must all be in `allowed` or `unsupported` (the
    /// latter are real fields sigil does not implement, rejected with their reason).
    pub(crate) fn object(
        &self,
        allowed: &'static [&'static str],
        unsupported: &[(&'static str, &'static str)],
    ) -> R<Obj<'v>> {
        let Value::Object(map) = self.v else {
            return Err(self.wrong("an object"));
        };
        for key in map.keys() {
            if allowed.contains(&key.as_str()) {
                continue;
            }
            let path = child(&self.path, key);
            if let Some((_, reason)) = unsupported.iter().find(|(k, _)| k == key) {
                return Err(Fail {
                    path,
                    problem: Problem::Unsupported {
                        reason: (*reason).to_owned(),
                    },
                });
            }
            return Err(Fail {
                path,
                problem: Problem::UnknownField {
                    field: key.clone(),
                    allowed: allowed.to_vec(),
                },
            });
        }
        Ok(Obj {
            map,
            path: self.path.clone(),
        })
    }

    /// This node as a list of nodes `path[i]`.
    pub(crate) fn list(&self) -> R<Vec<Node<'v>>> {
        let Value::Array(items) = self.v else {
            return Err(self.wrong("a list"));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| Node {
                v,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// This node as a string.
    pub(crate) fn str(&self) -> R<&'v str> {
        match self.v {
            Value::String(s) => Ok(s),
            _ => Err(self.wrong("a string")),
        }
    }

    /// This node as a boolean.
    pub(crate) fn bool(&self) -> R<bool> {
        match self.v {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.wrong("true or false")),
        }
    }

    /// This node as a list of strings.
    pub(crate) fn strings(&self) -> R<Vec<String>> {
        self.list()?
            .iter()
            .map(|n| n.str().map(str::to_owned))
            .collect()
    }

    /// An integer or a string of digits, in `0..=max`; anything else fails with `what`
    /// in the message. Strings that are not numbers are reported by `on_name`.
    pub(crate) fn port_number(
        &self,
        max: u64,
        on_name: impl FnOnce(&Node<'v>, &str) -> Fail,
    ) -> R<u64> {
        let n = match self.v {
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| self.invalid(format!("must be a whole number in 0..={max}")))?,
            Value::String(s) => {
                if s.is_empty() {
                    return Err(self.invalid(format!("must be a number in 0..={max}")));
                }
                if !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(on_name(self, s));
                }
                s.parse::<u64>()
                    .map_err(|_| self.invalid(format!("must be a number in 0..={max}")))?
            }
            _ => return Err(self.wrong("a number or a string of digits")),
        };
        if n > max {
            return Err(self.invalid(format!("out of range 0..={max}")));
        }
        Ok(n)
    }
}

/// An object whose keys were checked.
#[derive(Debug, Clone)]
pub(crate) struct Obj<'v> {
    map: &'v Map<String, Value>,
    pub(crate) path: String,
}

impl<'v> Obj<'v> {
    /// The field `key`, absent when missing or null (as Kubernetes treats null).
    pub(crate) fn get(&self, key: &str) -> Option<Node<'v>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Node {
                v,
                path: child(&self.path, key),
            }),
        }
    }

    /// Whether the field is present, even as null or empty.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The field `key`, failing when absent.
    pub(crate) fn required(&self, key: &str) -> R<Node<'v>> {
        self.get(key).ok_or_else(|| Fail {
            path: child(&self.path, key),
            problem: Problem::Missing,
        })
    }

    /// An optional string field.
    pub(crate) fn opt_str(&self, key: &str) -> R<Option<String>> {
        self.get(key)
            .map(|n| n.str().map(str::to_owned))
            .transpose()
    }

    /// An optional list field, empty when absent.
    pub(crate) fn list(&self, key: &str) -> R<Vec<Node<'v>>> {
        match self.get(key) {
            Some(n) => n.list(),
            None => Ok(Vec::new()),
        }
    }

    /// The path of a field of this object (present or not).
    pub(crate) fn path_of(&self, key: &str) -> String {
        child(&self.path, key)
    }
}
