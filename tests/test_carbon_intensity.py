"""Carbon-intensity sources: file formats, bad input, interpolation and accounting properties."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sustain.energy.carbon import JOULES_PER_KWH
from lightning_sustain.energy.intensity import (
    ENTSOE_EMISSION_FACTORS_G_PER_KWH,
    GRAMS_PER_POUND,
    ConstantIntensity,
    IntensityDataError,
    IntensityProvider,
    IntensitySeries,
    TimeSeriesIntensity,
    annual_intensity,
    read_intensity_file,
    time_resolved_co2e,
)
from lightning_sustain.testing.grid import diurnal_intensity, write_intensity_csv

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- formats ---------------------------------------------------------------------------
def test_generic_csv_with_offsets_and_naive_times_in_a_zone(tmp_path):
    path = _write(
        tmp_path,
        "g.csv",
        "# comment line\ntimestamp,g_co2e_per_kwh,marginal_g_co2e_per_kwh\n"
        "2024-01-01T00:00:00Z,100,500\n2024-01-01T01:00:00+00:00,200,\n"
        "2024-01-01 03:00:00+01:00,300,600\n",
    )
    s = read_intensity_file(path)
    assert s.times_unix_s.tolist() == [1704067200.0, 1704070800.0, 1704074400.0]
    assert s.g_co2e_per_kwh.tolist() == [100.0, 200.0, 300.0]
    assert s.marginal_g_co2e_per_kwh[0] == 500.0 and math.isnan(s.marginal_g_co2e_per_kwh[1])
    naive = _write(tmp_path, "n.csv", "timestamp,g_co2e_per_kwh\n2024-07-01 12:00,100\n")
    berlin = read_intensity_file(naive, timezone="Europe/Berlin")
    utc = read_intensity_file(naive)
    assert utc.times_unix_s[0] - berlin.times_unix_s[0] == 2 * 3600  # CEST is UTC+2
    with pytest.raises(IntensityDataError, match="IANA"):
        read_intensity_file(naive, timezone="Mars/Olympus")


def test_electricity_maps_csv_prefers_life_cycle(tmp_path):
    path = _write(
        tmp_path,
        "em.csv",
        "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
        "Carbon Intensity gCO₂eq/kWh (Life cycle),Carbon-free energy percentage (CFE%)\n"
        "2023-01-01 00:00:00,Germany,Germany,DE,400.5,450.25,40\n"
        "2023-01-01 01:00:00,Germany,Germany,DE,380,430,42\n",
    )
    s = read_intensity_file(path)
    assert s.g_co2e_per_kwh.tolist() == [450.25, 430.0]
    assert "[electricitymaps]" in s.source
    j = _write(
        tmp_path,
        "em.json",
        json.dumps(
            {
                "zone": "DE",
                "history": [
                    {"datetime": "2023-01-01T00:00:00.000Z", "carbonIntensity": 450},
                    {"datetime": "2023-01-01T01:00:00.000Z", "carbonIntensity": 430},
                ],
            }
        ),
    )
    assert read_intensity_file(j).g_co2e_per_kwh.tolist() == [450.0, 430.0]


def test_watttime_csv_and_json_convert_pounds_per_mwh(tmp_path):
    factor = GRAMS_PER_POUND / 1000.0
    csv_path = _write(
        tmp_path,
        "wt.csv",
        "point_time,value,frequency,market,ba,datatype\n"
        "2023-05-01T00:00:00Z,1000,300,RTM,CAISO_NORTH,MOER\n"
        "2023-05-01T00:05:00Z,800,300,RTM,CAISO_NORTH,MOER\n",
    )
    s = read_intensity_file(csv_path)
    assert np.allclose(s.g_co2e_per_kwh, [1000 * factor, 800 * factor])
    assert np.allclose(s.marginal_g_co2e_per_kwh, s.g_co2e_per_kwh)
    assert "marginal" in s.source
    j = _write(
        tmp_path,
        "wt.json",
        json.dumps(
            {
                "data": [{"point_time": "2023-05-01T00:00:00+00:00", "value": 1000}],
                "meta": {"units": "lbs_co2_per_mwh", "region": "CAISO_NORTH"},
            }
        ),
    )
    assert np.allclose(read_intensity_file(j).g_co2e_per_kwh, [1000 * factor])


def test_entsoe_generation_mix_uses_documented_factors(tmp_path):
    path = _write(
        tmp_path,
        "entsoe.csv",
        '"Area","MTU","Fossil Gas  - Actual Aggregated [MW]","Nuclear  - Actual Aggregated [MW]",'
        '"Solar  - Actual Aggregated [MW]"\n'
        '"BZN|DE-LU","01.01.2023 00:00 - 01.01.2023 01:00 (UTC)","100","300","n/e"\n'
        '"BZN|DE-LU","01.01.2023 01:00 - 01.01.2023 02:00 (UTC)","200","100","100"\n',
    )
    s = read_intensity_file(path)
    f = ENTSOE_EMISSION_FACTORS_G_PER_KWH
    assert s.times_unix_s.tolist() == [1672531200.0, 1672534800.0]
    assert s.g_co2e_per_kwh[0] == pytest.approx((100 * f["fossil gas"] + 300 * f["nuclear"]) / 400)
    assert s.g_co2e_per_kwh[1] == pytest.approx(
        (200 * f["fossil gas"] + 100 * f["nuclear"] + 100 * f["solar"]) / 400
    )
    unknown = _write(
        tmp_path,
        "u.csv",
        "MTU,Unobtainium  - Actual Aggregated [MW]\n01.01.2023 00:00 - 01.01.2023 01:00,5\n",
    )
    with pytest.raises(IntensityDataError, match="unobtainium.*emission_factors"):
        read_intensity_file(unknown)
    s2 = read_intensity_file(unknown, emission_factors={"Unobtainium": 5.0})
    assert s2.g_co2e_per_kwh.tolist() == [5.0]


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("timestamp,g_co2e_per_kwh\n2\n", "row 2: 1 fields"),
        ("timestamp,g_co2e_per_kwh\n100,5\n50,6\n", r"row 3 .* earlier than row 2.*sort"),
        ("timestamp,g_co2e_per_kwh\n100,5\n100,6\n", r"row 3 repeats the timestamp of row 2"),
        (
            "timestamp,g_co2e_per_kwh\n100,5\n200,-1\n",
            r"row 3: column 'g_co2e_per_kwh' is negative",
        ),
        ("timestamp,g_co2e_per_kwh\n100,abc\n", r"row 2: .*'abc', not a number"),
        ("timestamp,g_co2e_per_kwh,unit\n100,5,furlongs\n", r"row 2.*unit 'furlongs' is not known"),
        ("timestamp,intensity [stones/kWh]\n100,5\n", r"unit 'stones/kWh' is not known"),
        ("timestamp,foo\n100,5\n", "no intensity column"),
        ("timestamp,g_co2e_per_kwh\nyesterday,5\n", r"row 2: 'yesterday' is not a timestamp"),
        ("timestamp,g_co2e_per_kwh\n100,\n", "every intensity value is empty"),
        ("", "empty"),
    ],
)
def test_bad_files_name_file_and_row(tmp_path, body, match):
    path = _write(tmp_path, "bad.csv", body)
    with pytest.raises(IntensityDataError, match=match) as info:
        read_intensity_file(path)
    assert "bad.csv" in str(info.value)


def test_units_column_converts(tmp_path):
    path = _write(
        tmp_path, "u.csv", "timestamp,g_co2e_per_kwh,unit\n100,0.3,kg/kWh\n200,300,g/kWh\n"
    )
    assert read_intensity_file(path).g_co2e_per_kwh.tolist() == [300.0, 300.0]


def test_bad_json_names_record(tmp_path):
    path = _write(tmp_path, "b.json", json.dumps([{"datetime": "2023-01-01T00:00Z", "x": 1}]))
    with pytest.raises(IntensityDataError, match="record 1"):
        read_intensity_file(path)
    path = _write(tmp_path, "c.json", "[{")
    with pytest.raises(IntensityDataError, match="not valid JSON"):
        read_intensity_file(path)


def test_file_over_size_limit_is_refused(tmp_path):
    path = _write(tmp_path, "big.csv", "timestamp,g_co2e_per_kwh\n" + "1,1\n" * 100)
    with pytest.raises(IntensityDataError, match="byte limit"):
        read_intensity_file(path, max_bytes=50)


# -- coverage, gaps, fallback ----------------------------------------------------------
def test_not_covered_times_use_fallback_and_warn_once(caplog):
    series = IntensitySeries(np.array([0.0, 100.0, 200.0]), np.array([10.0, 20.0, 30.0]))
    source = TimeSeriesIntensity(series, fallback=ConstantIntensity(500.0, "test fallback"))
    assert source.end_unix_s == 300.0  # the last point holds for one resolution
    with caplog.at_level(logging.WARNING):
        mean, fb = source.mean_intensity(250.0, 350.0)
        source.mean_intensity(400.0, 500.0)
    assert fb == pytest.approx(50.0)
    assert mean == pytest.approx((50 * 30 + 50 * 500) / 100)
    assert len([r for r in caplog.records if "does not cover" in r.message]) == 1
    assert source.warnings and "does not cover" in source.warnings[0]
    assert source.intensity_at(-5).status == "fallback"
    strict = TimeSeriesIntensity(series, fallback=ConstantIntensity(500.0), strict=True)
    with pytest.raises(IntensityDataError, match="strict"):
        strict.mean_intensity(250.0, 350.0)


def test_gap_longer_than_max_gap_is_fallback():
    series = IntensitySeries(np.array([0.0, 10.0, 20.0, 100.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    source = TimeSeriesIntensity(series, fallback=ConstantIntensity(1000.0))
    # resolution 10 s, max gap 30 s: 20 holds until 30, then fallback until 100
    assert source.intensity_at(25).g_co2e_per_kwh == 3.0
    assert source.intensity_at(50).status == "fallback"
    _, fb = source.mean_intensity(0, 110)
    assert fb == pytest.approx(70.0)
    missing = IntensitySeries(np.array([0.0, 10.0, 20.0]), np.array([1.0, np.nan, 3.0]))
    assert TimeSeriesIntensity(missing).intensity_at(15).status == "fallback"


def test_linear_interpolation_is_exact_for_ramps():
    series = IntensitySeries(np.array([0.0, 10.0]), np.array([100.0, 200.0]))
    source = TimeSeriesIntensity(series, interpolation="linear")
    assert source.intensity_at(2.5).g_co2e_per_kwh == pytest.approx(125.0)
    assert source.mean_intensity(0, 10)[0] == pytest.approx(150.0)


def test_refresh_takes_valid_versions_and_keeps_old_data_on_invalid(tmp_path, caplog):
    path = _write(tmp_path, "live.csv", "timestamp,g_co2e_per_kwh\n0,100\n3600,200\n")
    source = TimeSeriesIntensity(path)
    assert source.refresh() is False  # unchanged
    path.write_text("timestamp,g_co2e_per_kwh\n0,300\n3600,400\n7200,500\n")
    os.utime(path, ns=(1, 10**18))
    assert source.refresh() is True
    assert source.intensity_at(10).g_co2e_per_kwh == 300.0
    path.write_text("timestamp,g_co2e_per_kwh\n0,300\n0,400\n")
    os.utime(path, ns=(1, 2 * 10**18))
    with caplog.at_level(logging.WARNING):
        assert source.refresh() is False
    assert source.intensity_at(10).g_co2e_per_kwh == 300.0
    assert "previous version stays in use" in caplog.text and "live.csv" in caplog.text
    strict = TimeSeriesIntensity(
        _write(tmp_path, "s.csv", "timestamp,g_co2e_per_kwh\n0,1\n"), strict=True
    )
    strict.path.write_text("timestamp,g_co2e_per_kwh\n0,-1\n")
    os.utime(strict.path, ns=(1, 3 * 10**18))
    with pytest.raises(IntensityDataError, match="invalid"):
        strict.refresh()


def test_constant_and_annual_sources_follow_the_protocol():
    assert isinstance(ConstantIntensity(100.0), IntensityProvider)
    de = annual_intensity("DE")
    assert de.g_co2e_per_kwh == 381 and "Ember" in de.source
    with pytest.raises(ValueError):
        ConstantIntensity(-1.0)


# -- properties ------------------------------------------------------------------------
sorted_series = st.lists(
    st.tuples(st.floats(1.0, 1000.0), st.floats(0.0, 2000.0)), min_size=1, max_size=30
).map(
    lambda pairs: (
        np.cumsum([p[0] for p in pairs]),
        np.asarray([p[1] for p in pairs]),
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=sorted_series,
    interp=st.sampled_from(["previous", "linear"]),
    a=st.floats(-2000, 40000),
    length=st.floats(0.0, 40000),
    cut=st.floats(0.0, 1.0),
)
def test_mean_is_bounded_and_additive(data, interp, a, length, cut):
    times, values = data
    fallback = ConstantIntensity(777.0)
    source = TimeSeriesIntensity(
        IntensitySeries(times, values), interpolation=interp, fallback=fallback
    )
    b = a + length
    mean, fb = source.mean_intensity(a, b)
    lo = min(values.min(), 777.0)
    hi = max(values.max(), 777.0)
    assert lo - 1e-6 <= mean <= hi + 1e-6
    assert -1e-6 <= fb <= length + 1e-6
    if length > 1e-3:
        m = a + cut * length
        m1, f1 = source.mean_intensity(a, m)
        m2, f2 = source.mean_intensity(m, b)
        assert m1 * (m - a) + m2 * (b - m) == pytest.approx(mean * length, rel=1e-6, abs=1e-3)
        assert f1 + f2 == pytest.approx(fb, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    value=st.floats(0.0, 5000.0),
    energies=st.lists(st.floats(0.0, 1e7), min_size=1, max_size=20),
    pue=st.floats(1.0, 2.0),
)
def test_time_resolved_equals_annual_for_a_constant_source(value, energies, pue):
    starts = T0 + 10.0 * np.arange(len(energies))
    result = time_resolved_co2e(starts, starts + 10.0, energies, ConstantIntensity(value), pue)
    expected = sum(energies) / JOULES_PER_KWH * pue * value
    assert result.total_co2e_g == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert result.fallback_fraction == 0.0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=sorted_series, order=st.permutations(list(range(6))))
def test_csv_round_trip_and_shuffled_rows_are_refused(tmp_path, data, order):
    times, values = data
    series = IntensitySeries(T0 + times, values)
    path = write_intensity_csv(series, tmp_path / "rt.csv")
    back = read_intensity_file(path)
    assert np.allclose(back.times_unix_s, series.times_unix_s, atol=1e-3)
    assert np.allclose(back.g_co2e_per_kwh, series.g_co2e_per_kwh, atol=1e-3)
    n = min(len(times), 6)
    perm = [i for i in order if i < n]
    if perm == sorted(perm):
        return
    lines = path.read_text().splitlines()
    body = lines[1 : n + 1]
    shuffled = [lines[0]] + [body[i] for i in perm] + lines[n + 1 :]
    path.write_text("\n".join(shuffled) + "\n")
    with pytest.raises(IntensityDataError, match=r"rt\.csv: row \d+ .*earlier than row \d+"):
        read_intensity_file(path)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=400))
def test_any_bytes_give_a_series_or_a_clear_error(tmp_path, blob):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(b"timestamp,g_co2e_per_kwh\n" + blob)
    try:
        series = read_intensity_file(path)
    except IntensityDataError as exc:
        assert "fuzz.csv" in str(exc)
        return
    assert np.all(np.diff(series.times_unix_s) > 0)
    finite = series.g_co2e_per_kwh[np.isfinite(series.g_co2e_per_kwh)]
    assert (finite >= 0).all()


def test_diurnal_trace_has_the_requested_swing():
    s = diurnal_intensity(T0, 86_400, noise=0.0, swing=3.0, mean_g_per_kwh=300)
    assert s.g_co2e_per_kwh.max() / s.g_co2e_per_kwh.min() == pytest.approx(3.0, rel=0.01)
    assert s.g_co2e_per_kwh.mean() == pytest.approx(300, rel=0.02)
