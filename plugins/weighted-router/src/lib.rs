//! Canary and A/B routing by weight.
//!
//! Configuration:
//!
//! - `weights`: the split for every model, as comma-separated
//!   `version=weight` pairs, e.g. `1.0.0=90,2.0.0=10`. Weights are
//!   non-negative integers relative to each other; they need not add up to
//!   100. Unset means no split: requests go to the latest version.
//! - `weights.<model>`: the split for one model, same format; overrides
//!   `weights` for that model. Read on the first request for the model, so
//!   an error in it shows on that request.
//! - `pin-header`: the metadata key that pins a version, default
//!   `x-plinth-version`.
//!
//! For each request, in order:
//!
//! 1. A version the client asked for explicitly is kept.
//! 2. A version named by the pin header is used.
//! 3. Otherwise the request goes to one of the split's versions that is
//!    ready, chosen by hashing the request id: the same id always lands on
//!    the same version, and ids spread in proportion to the weights. A
//!    version of the split that is not ready is skipped, and its share goes
//!    to the others.
//! 4. With no split, or none of its versions ready, the request goes to the
//!    latest ready version.
//!
//! Requests for a model that is not among the candidates pass through
//! unchanged, so that the host answers NOT_FOUND or UNAVAILABLE itself.
//!
//! Mirroring (shadow deployments, contract 0.1.1):
//!
//! - `mirror.<model>`: comma-separated targets, `name` or `name:version`,
//!   that every request routed to `<model>` also runs on, off the response
//!   path. The client gets `<model>`'s answer only.
//! - `mirror-percent`: the share of requests mirrored, 0 to 100 (default
//!   100), chosen by hashing the request id, so a request id is mirrored
//!   always or never.
//! - `mirror-tolerance`: how far an output element of a mirror may be from
//!   the primary's and still agree (default 1e-6).

use std::collections::BTreeMap;

use plinth_plugin_sdk::prelude::*;

const DEFAULT_PIN_HEADER: &str = "x-plinth-version";

struct WeightedRouter {
    default_split: Option<Split>,
    /// `weights.<model>` per model, looked up once: `None` when unset.
    model_splits: BTreeMap<String, Option<Split>>,
    pin_header: String,
    config: Config,
    /// `mirror.<model>` per model, looked up once.
    mirror_targets: BTreeMap<String, Vec<MirrorTarget>>,
    mirror_percent: u64,
    mirror_tolerance: f64,
}

/// Versions with their weights, in configuration order.
#[derive(Debug, Clone, PartialEq)]
struct Split {
    entries: Vec<(String, u64)>,
}

impl Plugin for WeightedRouter {
    fn init(config: &Config) -> Result<Self> {
        let default_split = config
            .get("weights")
            .map(|value| Split::parse("weights", &value))
            .transpose()?;
        let pin_header = config
            .get("pin-header")
            .map(|header| header.trim().to_ascii_lowercase())
            .unwrap_or_else(|| DEFAULT_PIN_HEADER.to_owned());
        let mirror_percent: u64 = config.parse_or("mirror-percent", 100)?;
        if mirror_percent > 100 {
            return Err(PluginError::unavailable(format!(
                "config key `mirror-percent`: expected 0 to 100, got {mirror_percent}"
            )));
        }
        let mirror_tolerance: f64 = config.parse_or("mirror-tolerance", 1e-6)?;
        if !(mirror_tolerance.is_finite() && mirror_tolerance >= 0.0) {
            return Err(PluginError::unavailable(format!(
                "config key `mirror-tolerance`: expected a number 0 or more, got {mirror_tolerance}"
            )));
        }
        Ok(WeightedRouter {
            default_split,
            model_splits: BTreeMap::new(),
            pin_header,
            config: config.clone(),
            mirror_targets: BTreeMap::new(),
            mirror_percent,
            mirror_tolerance,
        })
    }
}

impl Router for WeightedRouter {
    fn route(&mut self, req: &RequestInfo, candidates: &[ModelRef]) -> Result<RouteDecision> {
        let decision = |version: Option<&str>| RouteDecision {
            model: req.model.clone(),
            version: version.map(str::to_owned),
        };
        let Some(model) = candidates.iter().find(|model| model.name == req.model) else {
            return Ok(decision(req.version.as_deref()));
        };
        if let Some(version) = &req.version {
            return Ok(decision(Some(version)));
        }
        if let Some(version) = self.pinned_version(req) {
            return Ok(decision(Some(version)));
        }
        let split = self.split_for(&model.name)?;
        let chosen = split
            .and_then(|split| split.choose(&req.id, &model.versions))
            .or(model.versions.last().map(String::as_str));
        Ok(decision(chosen))
    }
}

impl MirroringRouter for WeightedRouter {
    fn mirrors(&mut self, req: &RequestInfo, primary: &RouteDecision) -> Result<Vec<MirrorTarget>> {
        if self.mirror_percent < 100 && hash(req.id.as_bytes()) % 100 >= self.mirror_percent {
            return Ok(Vec::new());
        }
        if !self.mirror_targets.contains_key(&primary.model) {
            let key = format!("mirror.{}", primary.model);
            let targets = match self.config.get(&key) {
                None => Vec::new(),
                Some(value) => parse_targets(&key, &value, self.mirror_tolerance)?,
            };
            self.mirror_targets.insert(primary.model.clone(), targets);
        }
        Ok(self.mirror_targets[&primary.model].clone())
    }
}

/// Parses `shadow,other:2`; `key` names the config key in errors.
fn parse_targets(key: &str, value: &str, tolerance: f64) -> Result<Vec<MirrorTarget>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (model, version) = match item.split_once(':') {
                Some((model, version)) => (model.trim(), Some(version.trim().to_owned())),
                None => (item, None),
            };
            if model.is_empty() || version.as_deref() == Some("") {
                return Err(PluginError::unavailable(format!(
                    "config key `{key}`: `{item}` is not `model` or `model:version`"
                )));
            }
            Ok(MirrorTarget {
                model: model.to_owned(),
                version,
                tolerance,
            })
        })
        .collect()
}

impl WeightedRouter {
    fn pinned_version<'r>(&self, req: &'r RequestInfo) -> Option<&'r str> {
        req.metadata
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(&self.pin_header))
            .map(|(_, value)| value.trim())
            .filter(|value| !value.is_empty())
    }

    fn split_for(&mut self, model: &str) -> Result<Option<&Split>> {
        if !self.model_splits.contains_key(model) {
            let key = format!("weights.{model}");
            let split = self
                .config
                .get(&key)
                .map(|value| Split::parse(&key, &value))
                .transpose()?;
            self.model_splits.insert(model.to_owned(), split);
        }
        let model_split = self.model_splits.get(model).and_then(Option::as_ref);
        Ok(model_split.or(self.default_split.as_ref()))
    }
}

impl Split {
    /// Parses `1.0.0=90,2.0.0=10`; `key` names the config key in errors.
    fn parse(key: &str, value: &str) -> Result<Split> {
        let bad = |detail: String| {
            PluginError::unavailable(format!(
                "config key `{key}`: {detail} (expected `version=weight,...`, e.g. `1.0.0=90,2.0.0=10`)"
            ))
        };
        let mut entries: Vec<(String, u64)> = Vec::new();
        for pair in value.split(',') {
            let pair = pair.trim();
            let Some((version, weight)) = pair.split_once('=') else {
                return Err(bad(format!("`{pair}` has no `=`")));
            };
            let (version, weight) = (version.trim(), weight.trim());
            if version.is_empty() {
                return Err(bad(format!("`{pair}` has no version")));
            }
            let weight: u64 = weight.parse().map_err(|err| {
                bad(format!(
                    "weight `{weight}` of version `{version}` is not a non-negative integer: {err}"
                ))
            })?;
            if entries.iter().any(|(seen, _)| seen == version) {
                return Err(bad(format!("version `{version}` appears twice")));
            }
            entries.push((version.to_owned(), weight));
        }
        let total = entries
            .iter()
            .try_fold(0u64, |total, (_, weight)| total.checked_add(*weight));
        match total {
            Some(0) => Err(bad("every weight is 0".to_owned())),
            Some(_) => Ok(Split { entries }),
            None => Err(bad("the weights add up to more than u64::MAX".to_owned())),
        }
    }

    /// The version for `request_id` among the split's versions that are in
    /// `ready`, or `None` when none is.
    fn choose<'s>(&'s self, request_id: &str, ready: &[String]) -> Option<&'s str> {
        let eligible = || {
            self.entries
                .iter()
                .filter(|(version, weight)| *weight > 0 && ready.contains(version))
        };
        // Parsing checked that the sum of all weights fits in a u64.
        let total: u64 = eligible().map(|(_, weight)| weight).sum();
        if total == 0 {
            return None;
        }
        let mut point = hash(request_id.as_bytes()) % total;
        for (version, weight) in eligible() {
            if point < *weight {
                return Some(version);
            }
            point -= weight;
        }
        None
    }
}

/// FNV-1a over `bytes`, then the SplitMix64 finaliser so that the low bits,
/// which the modulo keeps, depend on every input byte.
fn hash(bytes: &[u8]) -> u64 {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state ^= state >> 30;
    state = state.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    state ^= state >> 27;
    state = state.wrapping_mul(0x94d0_49bb_1331_11eb);
    state ^ (state >> 31)
}

export_mirroring_router!(WeightedRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(pairs: &[(&str, &str)]) -> WeightedRouter {
        WeightedRouter::init(&Config::from_pairs(pairs.iter().copied())).unwrap()
    }

    fn request(id: &str, version: Option<&str>, metadata: &[(&str, &str)]) -> RequestInfo {
        RequestInfo {
            id: id.to_owned(),
            model: "resnet".to_owned(),
            version: version.map(str::to_owned),
            metadata: metadata
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        }
    }

    fn candidates(versions: &[&str]) -> Vec<ModelRef> {
        vec![
            ModelRef {
                name: "other".to_owned(),
                versions: vec!["9".to_owned()],
            },
            ModelRef {
                name: "resnet".to_owned(),
                versions: versions.iter().map(|v| v.to_string()).collect(),
            },
        ]
    }

    fn routed_version(router: &mut WeightedRouter, req: &RequestInfo, ready: &[&str]) -> String {
        let decision = router.route(req, &candidates(ready)).unwrap();
        assert_eq!(decision.model, "resnet");
        decision.version.unwrap()
    }

    #[test]
    fn splits_by_weight_and_is_deterministic() {
        let mut router = router(&[("weights", "1.0.0=90, 2.0.0=10")]);
        let ready = ["1.0.0", "2.0.0"];
        let mut to_canary = 0;
        for request_idx in 0..10_000 {
            let req = request(&format!("req-{request_idx}"), None, &[]);
            let version = routed_version(&mut router, &req, &ready);
            assert_eq!(version, routed_version(&mut router, &req, &ready));
            if version == "2.0.0" {
                to_canary += 1;
            }
        }
        assert!(
            (800..1200).contains(&to_canary),
            "canary got {to_canary} of 10000"
        );
    }

    #[test]
    fn precedence_explicit_then_header_then_weights_then_latest() {
        let mut router = router(&[("weights", "1.0.0=1")]);
        let ready = ["1.0.0", "2.0.0", "3.0.0"];
        let pinned = [("x-plinth-version", "2.0.0")];
        let req = request("a", Some("3.0.0"), &pinned);
        assert_eq!(routed_version(&mut router, &req, &ready), "3.0.0");
        let req = request("a", None, &pinned);
        assert_eq!(routed_version(&mut router, &req, &ready), "2.0.0");
        let req = request("a", None, &[]);
        assert_eq!(routed_version(&mut router, &req, &ready), "1.0.0");
        let mut no_split = self::router(&[]);
        assert_eq!(routed_version(&mut no_split, &req, &ready), "3.0.0");
    }

    #[test]
    fn unready_versions_of_the_split_are_skipped() {
        let mut router = router(&[("weights", "1.0.0=50,2.0.0=50")]);
        for request_idx in 0..100 {
            let req = request(&request_idx.to_string(), None, &[]);
            assert_eq!(
                routed_version(&mut router, &req, &["2.0.0", "3.0.0"]),
                "2.0.0"
            );
        }
        let req = request("x", None, &[]);
        assert_eq!(
            routed_version(&mut router, &req, &["3.0.0", "4.0.0"]),
            "4.0.0"
        );
    }

    #[test]
    fn per_model_weights_override_the_default() {
        let mut router = router(&[("weights", "1.0.0=1"), ("weights.resnet", "2.0.0=1")]);
        let req = request("x", None, &[]);
        assert_eq!(
            routed_version(&mut router, &req, &["1.0.0", "2.0.0"]),
            "2.0.0"
        );
    }

    #[test]
    fn unknown_model_passes_through() {
        let mut router = router(&[]);
        let mut req = request("x", Some("7"), &[]);
        req.model = "missing".to_owned();
        let decision = router.route(&req, &candidates(&["1"])).unwrap();
        assert_eq!(decision.model, "missing");
        assert_eq!(decision.version.as_deref(), Some("7"));
    }

    #[test]
    fn mirrors_follow_the_config_and_the_percentage() {
        let mut router = router(&[
            ("mirror.m", "shadow, other:2"),
            ("mirror-tolerance", "0.01"),
        ]);
        let primary = RouteDecision {
            model: "m".into(),
            version: Some("1".into()),
        };
        let targets = router.mirrors(&request("a", None, &[]), &primary).unwrap();
        assert_eq!(
            targets,
            vec![
                MirrorTarget {
                    model: "shadow".into(),
                    version: None,
                    tolerance: 0.01
                },
                MirrorTarget {
                    model: "other".into(),
                    version: Some("2".into()),
                    tolerance: 0.01
                },
            ]
        );
        let other = RouteDecision {
            model: "n".into(),
            version: None,
        };
        assert!(
            router
                .mirrors(&request("a", None, &[]), &other)
                .unwrap()
                .is_empty()
        );
        // 30%: about 300 of 1000 ids, the same ids every time.
        let mut sampled = self::router(&[("mirror.m", "shadow"), ("mirror-percent", "30")]);
        let mirrored: Vec<bool> = (0..1000)
            .map(|i| {
                !sampled
                    .mirrors(&request(&i.to_string(), None, &[]), &primary)
                    .unwrap()
                    .is_empty()
            })
            .collect();
        let n = mirrored.iter().filter(|m| **m).count();
        assert!((250..350).contains(&n), "{n}");
        assert!(
            router_err(&[("mirror.m", "shadow:")]).contains("`shadow:` is not"),
            "an empty version is refused"
        );
    }

    fn router_err(pairs: &[(&str, &str)]) -> String {
        let mut router = router(pairs);
        let primary = RouteDecision {
            model: "m".into(),
            version: None,
        };
        router
            .mirrors(&request("a", None, &[]), &primary)
            .unwrap_err()
            .message()
            .to_owned()
    }

    #[test]
    fn bad_weights_are_refused_with_the_reason() {
        for (value, detail) in [
            ("1.0.0", "`1.0.0` has no `=`"),
            ("=5", "`=5` has no version"),
            (
                "1=a",
                "weight `a` of version `1` is not a non-negative integer",
            ),
            ("1=1,1=2", "version `1` appears twice"),
            ("1=0", "every weight is 0"),
        ] {
            let config = Config::from_pairs([("weights", value)]);
            let err = WeightedRouter::init(&config).err().unwrap();
            assert!(err.message().contains(detail), "{value}: {}", err.message());
            assert!(err.message().starts_with("config key `weights`: "));
        }
        let mut router = router(&[("weights.resnet", "oops")]);
        let err = router
            .route(&request("x", None, &[]), &candidates(&["1"]))
            .unwrap_err();
        assert!(err.message().starts_with("config key `weights.resnet`: "));
    }
}
