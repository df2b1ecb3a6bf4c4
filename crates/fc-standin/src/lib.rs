//! **Test stand-in for Firecracker — not a VMM.**
//!
//! Firecracker needs hardware KVM, which CI does not have, and no package registry reachable
//! here ships it. This crate lets metald's Firecracker driver be tested anyway:
//!
//! * [`Spec`] loads Firecracker's published v1.16.1 API description (`spec/`, Apache-2.0) and
//!   validates request bodies against it, the way Firecracker's own strict deserializers would
//!   (unknown fields refused, required fields, types, enums, ranges).
//! * The `firecracker-standin` binary serves that API on `--api-sock`, validates every request,
//!   enforces Firecracker's state rules (no configuration after InstanceStart, pause only when
//!   running, snapshots only when paused) and exits the way Firecracker does. Instead of booting
//!   a guest it prints the test guest's console lines on stdout.
//!
//! When `FIRECRACKER_BIN` points at a real Firecracker, metald's tests use that instead.

use serde_json::Value;

/// Firecracker's API description.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

const SPEC_YAML: &str = include_str!("../spec/firecracker-v1.16.1.yaml");

impl Spec {
    /// Loads the embedded v1.16.1 spec.
    pub fn load() -> Result<Spec, String> {
        let doc: Value = serde_yaml::from_str(SPEC_YAML).map_err(|e| format!("spec: {e}"))?;
        Ok(Spec { doc })
    }

    /// The path template (`/drives/{drive_id}`) that `path` matches, if any.
    pub fn template(&self, path: &str) -> Option<String> {
        let paths = self.doc.get("paths")?.as_object()?;
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        paths
            .keys()
            .find(|tpl| {
                let t: Vec<&str> = tpl.trim_end_matches('/').split('/').collect();
                t.len() == segs.len()
                    && t.iter()
                        .zip(&segs)
                        .all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
            })
            .cloned()
    }

    /// Checks that `method path` exists and that `body` satisfies its body schema (a missing
    /// body is `Null`). Returns a message in Firecracker's style when it does not.
    pub fn validate(&self, method: &str, path: &str, body: &Value) -> Result<(), String> {
        let tpl = self
            .template(path)
            .ok_or_else(|| format!("Invalid request method and/or path: {method} {path}"))?;
        let op = self.doc["paths"][&tpl]
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| format!("Invalid request method and/or path: {method} {path}"))?;
        let schema = op
            .get("parameters")
            .and_then(Value::as_array)
            .and_then(|ps| ps.iter().find(|p| p["in"] == "body"))
            .map(|p| &p["schema"]);
        match (schema, body.is_null()) {
            (None, true) => Ok(()),
            (None, false) => Err(format!("{method} {path} takes no body")),
            (Some(_), true) => Err(format!("{method} {path} needs a body")),
            (Some(s), false) => self.check(s, body, "body"),
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/definitions/");
                &self.doc["definitions"][name]
            }
            None => schema,
        }
    }

    fn check(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let s = self.resolve(schema);
        if let Some(allowed) = s.get("enum").and_then(Value::as_array)
            && !allowed.contains(v)
        {
            return Err(format!(
                "{at}: {v} is not one of {}",
                Value::Array(allowed.clone())
            ));
        }
        match s.get("type").and_then(Value::as_str).unwrap_or("object") {
            "object" => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| format!("{at}: expected an object, got {v}"))?;
                for req in s
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = req.as_str().unwrap_or("");
                    if !obj.contains_key(name) {
                        return Err(format!("{at}: missing field `{name}`"));
                    }
                }
                let props = s.get("properties").and_then(Value::as_object);
                for (k, val) in obj {
                    match props.and_then(|p| p.get(k)) {
                        Some(ps) => self.check(ps, val, &format!("{at}.{k}"))?,
                        // Firecracker's deserializers deny unknown fields.
                        None if props.is_some() => {
                            return Err(format!("{at}: unknown field `{k}`"));
                        }
                        None => {}
                    }
                }
                Ok(())
            }
            "string" if v.is_string() => Ok(()),
            "boolean" if v.is_boolean() => Ok(()),
            "integer" if v.is_i64() || v.is_u64() => {
                let n = v.as_f64().unwrap_or(0.0);
                if let Some(min) = s.get("minimum").and_then(Value::as_f64)
                    && n < min
                {
                    return Err(format!("{at}: {n} is below the minimum {min}"));
                }
                if let Some(max) = s.get("maximum").and_then(Value::as_f64)
                    && n > max
                {
                    return Err(format!("{at}: {n} is above the maximum {max}"));
                }
                Ok(())
            }
            "number" if v.is_number() => Ok(()),
            "array" => {
                let items = v
                    .as_array()
                    .ok_or_else(|| format!("{at}: expected an array, got {v}"))?;
                for (i, it) in items.iter().enumerate() {
                    self.check(&s["items"], it, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            t => Err(format!("{at}: expected {t}, got {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_like_firecracker() {
        let s = Spec::load().unwrap();
        assert!(
            s.validate(
                "PUT",
                "/machine-config",
                &json!({"vcpu_count": 2, "mem_size_mib": 256})
            )
            .is_ok()
        );
        assert!(
            s.validate(
                "PUT",
                "/machine-config",
                &json!({"vcpu_count": 0, "mem_size_mib": 256})
            )
            .is_err()
        );
        assert!(
            s.validate("PUT", "/machine-config", &json!({"mem_size_mib": 256}))
                .is_err()
        );
        assert!(
            s.validate(
                "PUT",
                "/machine-config",
                &json!({"vcpu_count": 1, "mem_size_mib": 1, "bogus": 1})
            )
            .is_err()
        );
        assert!(
            s.validate("PUT", "/actions", &json!({"action_type": "InstanceStart"}))
                .is_ok()
        );
        assert!(
            s.validate("PUT", "/actions", &json!({"action_type": "Reboot"}))
                .is_err()
        );
        assert!(s.validate("PUT", "/drives/root", &json!({"drive_id": "root", "is_root_device": true, "path_on_host": "/x", "is_read_only": false})).is_ok());
        assert!(
            s.validate("PATCH", "/vm", &json!({"state": "Paused"}))
                .is_ok()
        );
        assert!(s.validate("GET", "/", &Value::Null).is_ok());
        assert!(s.validate("DELETE", "/", &Value::Null).is_err());
        assert!(s.validate("PUT", "/nope", &json!({})).is_err());
    }
}
