//! The API suite: every case runs against the real server over HTTP, through the SDK, once on
//! SQLite and once on PostgreSQL (`BURSAR_TEST_DATABASE_URL`).

mod cases;
mod harness;
mod idempotency;
mod live;
mod money;
mod operations;
mod product;
mod webhooks;
mod workers;

macro_rules! api_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let app = crate::harness::TestApp::start(crate::harness::Backend::Sqlite).await.unwrap();
                    crate::$case(&app).await;
                    app.stop().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(app) = crate::harness::TestApp::start(crate::harness::Backend::Postgres).await else { return };
                    crate::$case(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}

use cases::*;
use idempotency::*;
use live::*;
use money::*;
use operations::*;
use product::*;
use webhooks::*;
use workers::*;

api_suite!(
    canonical_order_request,
    amounts_render_with_the_currency_decimals,
    bad_amounts_are_422_naming_the_field,
    customers_crud_with_etags,
    updates_need_a_current_version,
    concurrent_patches_have_one_winner,
    accounts_cannot_see_each_other,
    cancel_follows_the_state_machine,
    lists_page_and_filter,
    every_error_class_has_the_envelope,
    problem_json_has_the_same_members,
    request_ids_and_trace_context,
    health_readiness_and_docs,
    group_commit_is_measured,
    retries_replay_the_first_response,
    malformed_keys_are_400_and_store_nothing,
    scope_and_what_is_stored,
    concurrent_identical_requests_create_once,
    expired_keys_run_as_new_requests,
    concurrent_keys_and_bodies,
    a_crashed_run_resumes_after_its_lease_without_charging_twice,
    the_completer_finishes_abandoned_work,
    a_stalled_driver_is_fenced_out,
    retryable_failures_pause_and_give_up_in_the_end,
    keys_are_bound_to_their_route_and_query,
    card_flows_for_every_test_payment_method,
    a_processor_that_times_out_then_recovers_charges_once,
    concurrent_refunds_never_exceed_the_capture,
    conversions_round_half_even_and_refuse_cleanly,
    random_money_traffic_keeps_the_ledger_balanced,
    an_order_is_charged_once_under_concurrent_payments,
    the_sdk_pays_refunds_and_converts,
    a_receiver_outage_loses_no_event,
    an_attempt_is_recorded_after_a_database_outage,
    delivered_deliveries_are_purged_after_retention,
    a_refusing_receiver_loses_no_event,
    fifo_endpoints_receive_each_order_in_version_order,
    webhook_endpoints_are_guarded_scoped_and_rotate,
    a_write_wakes_the_relay_before_its_poll,
    many_workers_send_each_delivery_once,
    a_stopped_worker_gives_back_what_a_slot_held_unsent,
    a_slot_sends_nothing_it_holds_after_a_410,
    sse_resumes_from_the_log_then_goes_live,
    a_revoked_or_expired_key_ends_its_streams,
    a_slow_subscriber_is_dropped_and_resumes,
    websocket_subscribes_resumes_and_unsubscribes,
    two_instances_share_events_through_nats,
    events_wait_in_the_log_while_nats_is_down,
    reconnecting_under_load_never_gaps_or_repeats,
    a_replayed_create_emits_one_event,
    answers_are_classified_and_capped,
    a_rotated_secret_stops_signing_after_its_grace,
    shutdown_hands_back_in_flight_deliveries,
    tls_failures_are_told_from_refused_connections,
    the_circuit_breaker_holds_back_probes_and_drains,
    a_failing_endpoint_is_disabled_with_an_event,
    replay_resends_the_same_events,
    keys_are_scoped_expire_roll_and_revoke,
    rate_limits_answer_429_with_headers_and_recover,
    failed_authentication_is_throttled_per_ip,
    monthly_quota_is_exact_free_on_replay_and_resets,
    usage_is_metered_and_priced_on_the_invoice,
    two_instances_share_limits_and_revocations_through_redis,
    reads_overlap_their_rate_check_and_answer_the_same,
    a_redis_outage_follows_the_fail_mode,
    usage_counted_in_memory_survives_a_graceful_shutdown,
    every_client_address_has_its_own_request_budget,
    plan_changes_keep_the_period_usage_and_refusals_cost_nothing,
);
