//! The end-to-end scenarios against the cloud's embedded broker (no external service).

use super::harness::BrokerChoice;
use super::scenarios;

#[test]
fn up_down_both_and_commands() {
    scenarios::up_down_both_and_commands(BrokerChoice::Embedded(0));
}

#[test]
fn offline_catch_up_with_deletes() {
    scenarios::offline_catch_up_with_deletes(BrokerChoice::Embedded(0));
}

#[test]
fn conflict_converges_and_is_logged() {
    scenarios::conflict_converges_and_is_logged(BrokerChoice::Embedded(0));
}

#[test]
fn agent_killed_mid_batch() {
    scenarios::agent_killed_mid_batch(BrokerChoice::Embedded(0));
}

#[test]
fn cloud_killed_mid_apply() {
    scenarios::cloud_killed_mid_apply(BrokerChoice::Embedded(0));
}

#[test]
fn killed_device_goes_offline() {
    scenarios::killed_device_goes_offline(BrokerChoice::Embedded(0));
}

#[test]
fn newer_device_schema_is_kept_whole_and_said() {
    scenarios::newer_device_schema_is_kept_whole_and_said(BrokerChoice::Embedded(0));
}

#[test]
fn hostile_messages_get_error_replies() {
    scenarios::hostile_messages_get_error_replies(BrokerChoice::Embedded(0));
}

#[test]
fn offline_past_retention_resyncs() {
    scenarios::offline_past_retention_resyncs(BrokerChoice::Embedded(0));
}

#[test]
fn hostile_pushes_cannot_touch_other_models_or_the_clock() {
    scenarios::hostile_pushes_cannot_touch_other_models_or_the_clock(BrokerChoice::Embedded(0));
}
