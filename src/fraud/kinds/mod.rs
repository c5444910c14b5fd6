//! One file per rule kind: how its parameters compile into a check (keeping the keyed state of
//! the same-named rule across a reload when its shape is unchanged) and when the check fires.

mod block_list;
mod card_not_present;
mod card_testing;
mod chip_fallback;
mod country_mismatch;
mod expired_card;
mod high_risk_mcc;
mod impossible_travel;
mod mcc_amount_limit;
mod score;
mod velocity;

pub(super) use block_list::BlockList;
pub(super) use card_not_present::CardNotPresent;
pub(super) use card_testing::CardTesting;
pub(super) use chip_fallback::ChipFallback;
pub(super) use country_mismatch::CountryMismatch;
pub(super) use expired_card::ExpiredCard;
pub(super) use high_risk_mcc::HighRiskMcc;
pub(super) use impossible_travel::ImpossibleTravel;
pub(super) use mcc_amount_limit::MccAmountLimit;
pub(super) use score::Score;
pub(super) use velocity::Velocity;
