//! Entity relations (ThingsBoard's `EntityRelation`): a typed, directed link `from → to` in a
//! type group (`COMMON` unless said otherwise), kept in the metadata map.
//!
//! Keys: `reg/rel/<from type>/<from id>/<group>/<hex of type>/<to type>/<to id>` (the relation)
//! and `reg/relto/<to type>/<to id>/<group>/<hex of type>/<from type>/<from id>` (the index of
//! relations by their target). The relation type is free text, so it is hex-encoded in keys.

use serde::{Deserialize, Serialize};
use thingraft_log::{MetaCheck, MetaOp, MetaTxn};
use uuid::Uuid;

use crate::registry::{Registry, RegistryError, dec, enc};

/// The type group of ordinary relations.
pub const COMMON: &str = "COMMON";
/// The relation a gateway has to each child device it created.
pub const CREATED: &str = "Created";
/// ThingsBoard's relation type groups.
pub const TYPE_GROUPS: &[&str] = &[
    "COMMON",
    "DASHBOARD",
    "RULE_CHAIN",
    "RULE_NODE",
    "EDGE",
    "EDGE_AUTO_ASSIGN_RULE_CHAIN",
    "FROM_ENTITY_GROUP",
];

/// One end of a relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRef {
    /// `DEVICE`, `DEVICE_PROFILE`, `TENANT`, ...
    pub entity_type: String,
    pub id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub from: EntityRef,
    pub to: EntityRef,
    /// The relation type (`Contains`, `Manages`, `Created`, ...).
    pub kind: String,
    pub group: String,
    /// JSON text (`null` when absent).
    pub additional_info: String,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn key(r: &Relation) -> String {
    format!(
        "reg/rel/{}/{}/{}/{}/{}/{}",
        r.from.entity_type,
        r.from.id,
        r.group,
        hex(&r.kind),
        r.to.entity_type,
        r.to.id
    )
}

fn to_key(r: &Relation) -> String {
    format!(
        "reg/relto/{}/{}/{}/{}/{}/{}",
        r.to.entity_type,
        r.to.id,
        r.group,
        hex(&r.kind),
        r.from.entity_type,
        r.from.id
    )
}

impl Registry {
    /// Creates or replaces a relation.
    pub async fn save_relation(&self, r: &Relation) -> Result<(), RegistryError> {
        self.log()
            .meta_txn(MetaTxn {
                checks: vec![],
                ops: vec![MetaOp::Put(key(r), enc(r)), MetaOp::Put(to_key(r), enc(&()))],
            })
            .await?;
        Ok(())
    }

    /// The stored relation with `r`'s ends, type and group.
    pub fn relation(&self, r: &Relation) -> Option<Relation> {
        self.log().meta_get(&key(r)).and_then(|b| dec(&b))
    }

    /// Deletes the relation with `r`'s ends, type and group; false if there was none.
    pub async fn delete_relation(&self, r: &Relation) -> Result<bool, RegistryError> {
        let res = self
            .log()
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Present(key(r))],
                ops: vec![MetaOp::Delete(key(r)), MetaOp::Delete(to_key(r))],
            })
            .await?;
        Ok(res.failed_check.is_none())
    }

    /// Relations from `from`, in `group` if given.
    pub fn relations_from(&self, from: &EntityRef, group: Option<&str>) -> Vec<Relation> {
        let prefix = match group {
            Some(g) => format!("reg/rel/{}/{}/{g}/", from.entity_type, from.id),
            None => format!("reg/rel/{}/{}/", from.entity_type, from.id),
        };
        self.log()
            .meta_scan(&prefix, usize::MAX)
            .into_iter()
            .filter_map(|(_, v)| dec(&v))
            .collect()
    }

    /// Relations to `to`, in `group` if given.
    pub fn relations_to(&self, to: &EntityRef, group: Option<&str>) -> Vec<Relation> {
        let prefix = match group {
            Some(g) => format!("reg/relto/{}/{}/{g}/", to.entity_type, to.id),
            None => format!("reg/relto/{}/{}/", to.entity_type, to.id),
        };
        self.log()
            .meta_scan(&prefix, usize::MAX)
            .into_iter()
            .filter_map(|(k, _)| {
                // .../<group>/<hex type>/<from type>/<from id>: the relation's own key.
                let rest = k.strip_prefix(&format!("reg/relto/{}/{}/", to.entity_type, to.id))?;
                let mut parts = rest.split('/');
                let (group, kind, from_type, from_id) =
                    (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                let key = format!(
                    "reg/rel/{from_type}/{from_id}/{group}/{kind}/{}/{}",
                    to.entity_type, to.id
                );
                self.log().meta_get(&key).and_then(|b| dec(&b))
            })
            .collect()
    }

    /// The operations that delete every relation from or to `entity` (for its deletion).
    pub(crate) fn relation_delete_ops(&self, entity: &EntityRef) -> Vec<MetaOp> {
        self.relations_from(entity, None)
            .into_iter()
            .chain(self.relations_to(entity, None))
            .flat_map(|r| [MetaOp::Delete(key(&r)), MetaOp::Delete(to_key(&r))])
            .collect()
    }
}
