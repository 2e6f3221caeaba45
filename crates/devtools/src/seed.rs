//! `resonance-task seed`: creates sessions of chosen sizes whose members are
//! drawn from a pool of simulated users, reproducibly (seeded RNG).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use serde::Serialize;

use resonance_reference_gateway::user_name;
use resonance_task::store::{MemberError, MemberStore, SessionSeed};

/// `SIZExCOUNT` groups, e.g. `2x200,1000x3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMix(pub Vec<(usize, usize)>);

impl std::str::FromStr for SessionMix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut mix = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size, count) = part
                .split_once('x')
                .ok_or_else(|| format!("`{part}` is not SIZExCOUNT (e.g. 100x20)"))?;
            let size: usize = size
                .parse()
                .map_err(|_| format!("`{size}` in `{part}` is not a size"))?;
            let count: usize = count
                .parse()
                .map_err(|_| format!("`{count}` in `{part}` is not a count"))?;
            if size < 2 {
                return Err(format!("`{part}`: a session has at least 2 members"));
            }
            mix.push((size, count));
        }
        if mix.is_empty() {
            return Err("no sessions given".into());
        }
        Ok(Self(mix))
    }
}

#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub users: usize,
    pub user_prefix: String,
    pub mix: SessionMix,
    pub rng_seed: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SeedSummary {
    pub sessions: usize,
    pub memberships: usize,
    pub largest: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("a session of {size} members needs at least {size} users (have {users})")]
    TooFewUsers { size: usize, users: usize },
    #[error(transparent)]
    Store(#[from] MemberError),
}

/// The sessions a plan creates, without touching the database.
pub fn sessions(plan: &SeedPlan) -> Result<Vec<SessionSeed>, SeedError> {
    let mut rng = StdRng::seed_from_u64(plan.rng_seed);
    let mut out = Vec::new();
    for &(size, count) in &plan.mix.0 {
        if size > plan.users {
            return Err(SeedError::TooFewUsers {
                size,
                users: plan.users,
            });
        }
        for i in 0..count {
            let members: Vec<String> = sample(&mut rng, plan.users, size)
                .into_iter()
                .map(|u| user_name(&plan.user_prefix, u))
                .collect();
            out.push(SessionSeed {
                session_id: format!("s-{size}-{i:04}"),
                kind: if size == 2 { 1 } else { 2 },
                name: format!("{size}-member session {i}"),
                owner: members[0].clone(),
                members,
            });
        }
    }
    Ok(out)
}

pub async fn seed(store: &MemberStore, plan: &SeedPlan) -> Result<SeedSummary, SeedError> {
    let sessions = sessions(plan)?;
    for s in &sessions {
        store.create_session(s).await?;
    }
    Ok(SeedSummary {
        sessions: sessions.len(),
        memberships: sessions.iter().map(|s| s.members.len()).sum(),
        largest: sessions.iter().map(|s| s.members.len()).max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn mix_parses() {
        assert_eq!(
            "2x3, 10x1".parse::<SessionMix>().unwrap(),
            SessionMix(vec![(2, 3), (10, 1)])
        );
        assert!("1x3".parse::<SessionMix>().is_err());
        assert!("2by3".parse::<SessionMix>().is_err());
        assert!("".parse::<SessionMix>().is_err());
    }

    #[test]
    fn sessions_are_reproducible_and_members_distinct() {
        let plan = SeedPlan {
            users: 50,
            user_prefix: "u".into(),
            mix: "2x3,40x2".parse().unwrap(),
            rng_seed: 7,
        };
        let a = sessions(&plan).unwrap();
        let b = sessions(&plan).unwrap();
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.members, y.members);
            let distinct: HashSet<_> = x.members.iter().collect();
            assert_eq!(distinct.len(), x.members.len());
        }
        assert_eq!(a[0].kind, 1);
        assert_eq!(a[4].kind, 2);
        let too_big = SeedPlan { users: 10, ..plan };
        assert!(matches!(
            sessions(&too_big),
            Err(SeedError::TooFewUsers { size: 40, .. })
        ));
    }
}
